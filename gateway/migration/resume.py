"""Opening the continuation of a moved request: ``POST /v1/migration/resume`` with its final
state, on the target the source named, else back on the source (it hands requests over only
to a target that answered, but the target may die right after the switch)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from sllm.errors import Unavailable
from sllm.instance_auth import auth_header

log = logging.getLogger(__name__)


class StreamResumer:
    """``Resume`` for ``follow_moves``: tries the target, then ``fallbacks`` (base URLs).

    ``client`` is the proxy's instance client: ``httpx.AsyncClient`` or one with
    ``post(url, body)`` returning a streamed response (``status_code``, ``aiter_raw``,
    ``aread``, ``aclose``). ``secret_at(address)``: the secret the instance at that address
    wants (sllm.instance_auth)."""

    def __init__(self, client: Any, fallbacks: list[str], secret_at: Callable[[str], str]) -> None:
        self._client = client
        self._fallbacks = fallbacks
        self._secret_at = secret_at

    async def __call__(self, moved: dict[str, Any]) -> AsyncIterator[bytes]:
        target = str(moved.get("target_address") or "")
        rid = str(moved.get("request_id") or "?")
        candidates = list(dict.fromkeys([a for a in [target, *self._fallbacks] if a]))
        reasons: list[str] = []
        for address in candidates:
            try:
                return await self._open(address, moved["state"])
            except Exception as exc:  # whatever the client raises: try the next candidate
                reason = exc.message if isinstance(exc, Unavailable) else repr(exc)
                reasons.append(f"{address}: {reason}")
                log.warning("resume of moved request %s failed at %s: %s", rid, address, reason)
        raise Unavailable(
            f"request {rid} was moved but could not be resumed ({'; '.join(reasons)})"
        )

    async def _open(self, address: str, state: dict[str, Any]) -> AsyncIterator[bytes]:
        url = f"{address}/v1/migration/resume"
        body = json.dumps({"state": state}).encode()
        secret = self._secret_at(address)
        if isinstance(self._client, httpx.AsyncClient):
            headers = {"content-type": "application/json", **auth_header(secret)}
            request = self._client.build_request("POST", url, content=body, headers=headers)
            response: Any = await self._client.send(request, stream=True)
        else:
            response = await self._client.post(url, body, secret=secret)
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", errors="replace")[:300]
            await response.aclose()
            raise Unavailable(f"answered {response.status_code}: {text}")
        return _chunks(response)


async def _chunks(response: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()
