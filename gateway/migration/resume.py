"""Opening the continuation of a moved request: ``POST /v1/migration/resume`` with its final
state, on the target the source named, else back on the source (it hands requests over only
to a target that answered, but the target may die right after the switch)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from sllm.errors import Unavailable

log = logging.getLogger(__name__)


class StreamResumer:
    """``Resume`` for ``follow_moves``: tries the target, then ``fallbacks`` (base URLs)."""

    def __init__(self, client: httpx.AsyncClient, fallbacks: list[str]) -> None:
        self._client = client
        self._fallbacks = fallbacks

    async def __call__(self, moved: dict[str, Any]) -> AsyncIterator[bytes]:
        target = str(moved.get("target_address") or "")
        rid = str(moved.get("request_id") or "?")
        candidates = list(dict.fromkeys([a for a in [target, *self._fallbacks] if a]))
        reasons: list[str] = []
        for address in candidates:
            try:
                return await self._open(address, moved["state"])
            except (httpx.HTTPError, Unavailable) as exc:
                reason = exc.message if isinstance(exc, Unavailable) else repr(exc)
                reasons.append(f"{address}: {reason}")
                log.warning("resume of moved request %s failed at %s: %s", rid, address, reason)
        raise Unavailable(
            f"request {rid} was moved but could not be resumed ({'; '.join(reasons)})"
        )

    async def _open(self, address: str, state: dict[str, Any]) -> AsyncIterator[bytes]:
        request = self._client.build_request(
            "POST", f"{address}/v1/migration/resume", json={"state": state}
        )
        response = await self._client.send(request, stream=True)
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", errors="replace")[:300]
            await response.aclose()
            raise Unavailable(f"answered {response.status_code}: {body}")
        return _chunks(response)


async def _chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()
