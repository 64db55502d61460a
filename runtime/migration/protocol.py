"""The multi-round migration protocol, driven over the instances' HTTP migration endpoints.

1. Round k: read the source's streamed in-flight requests (tokens so far + sampling state) and
   import them on the target, which recomputes their KV caches while the source keeps decoding.
2. Stop when the tokens generated since the previous round are at most ``threshold_tokens``
   (or after ``max_rounds`` rounds): check the target is alive, then switch: the source stops
   the requests between two steps and ends each stream with its final state; the gateway
   resumes that state on the target (only the last few tokens are left to prefill there).
3. Any failure before the switch aborts: the target drops what it staged, the source was never
   interrupted (nothing lost). The switch is the commit point.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from sllm.errors import SllmError
from sllm.instance_auth import auth_header

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], Awaitable[None]]
"""``progress(phase, round, tokens)``: phase is "round" (tokens = new tokens staged) or
"switched" (tokens = tokens of the moved requests)."""


class MigrationFailed(SllmError):
    code = "migration_failed"
    status = 502


@dataclass(frozen=True)
class MigrationOutcome:
    """``tokens``: prompt + output tokens of the moved requests at the switch (the cost model's
    t_in + t_out); ``rounds_s`` the rounds, ``switch_s`` the switch, ``seconds`` the total."""

    moved: int
    finished: int
    rounds: int
    tokens: int
    rounds_s: float
    switch_s: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "moved": self.moved,
            "finished": self.finished,
            "rounds": self.rounds,
            "tokens": self.tokens,
            "rounds_s": round(self.rounds_s, 6),
            "switch_s": round(self.switch_s, 6),
            "seconds": round(self.seconds, 6),
        }


def _tokens(state: dict[str, Any]) -> int:
    return len(state.get("prompt_ids", ())) + len(state.get("output_ids", ()))


@dataclass(frozen=True)
class Peer:
    """An instance the protocol calls: its base URL and its secret (sllm.instance_auth)."""

    url: str
    secret: str = field(default="", repr=False)


async def _call(
    http: httpx.AsyncClient, method: str, peer: Peer, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One JSON call; raises httpx errors, or MigrationFailed on an error status."""
    url = f"{peer.url}{path}"
    response = await http.request(method, url, json=body, headers=auth_header(peer.secret))
    if response.status_code != 200:
        raise MigrationFailed(f"{method} {url} answered {response.status_code}: {response.text}")
    data = response.json()
    if not isinstance(data, dict):
        raise MigrationFailed(f"{method} {url} answered a non-object")
    return data


async def _abort(http: httpx.AsyncClient, target: Peer, ids: list[str]) -> None:
    # the target may be gone or sick: its staged caches then expire there by themselves
    with contextlib.suppress(httpx.HTTPError, SllmError, ValueError):
        await _call(http, "POST", target, "/v1/migration/abort", {"request_ids": ids})


async def migrate_requests(
    http: httpx.AsyncClient,
    source: Peer,
    target: Peer,
    target_instance_id: str,
    *,
    max_rounds: int,
    threshold_tokens: int,
    progress: Progress,
) -> MigrationOutcome:
    """Move the streamed in-flight requests of the instance at ``source`` to the one at
    ``target``. MigrationFailed before the switch leaves them on the source."""
    started = time.monotonic()
    staged: dict[str, int] = {}
    rounds = 0
    while True:
        try:
            data = await _call(http, "GET", source, "/v1/migration/requests")
        except (httpx.HTTPError, ValueError) as exc:
            await _abort(http, target, list(staged))
            raise MigrationFailed(f"source instance failed during migration: {exc!r}") from None
        states: list[dict[str, Any]] = list(data.get("requests", []))
        new = sum(_tokens(s) - staged.get(s["request_id"], 0) for s in states)
        if not states or rounds >= max(1, max_rounds) or (rounds and new <= threshold_tokens):
            break
        try:
            await _call(http, "POST", target, "/v1/migration/import", {"states": states})
        except (httpx.HTTPError, ValueError, SllmError) as exc:
            await _abort(http, target, list(staged))
            raise MigrationFailed(
                f"target instance failed before the switch ({exc!r}); "
                "the requests stay on the source"
            ) from None
        rounds += 1
        staged.update({s["request_id"]: _tokens(s) for s in states})
        log.info("migration round %d: %d requests, %d new tokens", rounds, len(states), new)
        await progress("round", rounds, new)
    rounds_done = time.monotonic()
    # Staged requests that finished on the source between two rounds: nothing to move, and
    # the target drops their caches now rather than when they expire.
    ended = [rid for rid in staged if rid not in {s["request_id"] for s in states}]
    if ended:
        await _abort(http, target, ended)
    if not states:
        elapsed = rounds_done - started
        return MigrationOutcome(0, len(ended), rounds, 0, elapsed, 0.0, elapsed)
    try:  # past the switch the target owns the requests: make sure it still answers
        await _call(http, "GET", target, "/healthz")
    except (httpx.HTTPError, ValueError, SllmError) as exc:
        await _abort(http, target, list(staged))
        raise MigrationFailed(
            f"target instance is not ready for the switch ({exc!r}); the requests stay on the source"
        ) from None
    ids = [s["request_id"] for s in states]
    body = {
        "request_ids": ids,
        "target_instance_id": target_instance_id,
        "target_address": target.url,
    }
    try:
        reply = await _call(http, "POST", source, "/v1/migration/handoff", body)
    except (httpx.HTTPError, ValueError) as exc:
        await _abort(http, target, ids)
        raise MigrationFailed(f"source instance failed at the switch: {exc!r}") from None
    moved: list[dict[str, Any]] = list(reply.get("moved", []))
    finished: list[str] = list(reply.get("finished", []))
    if finished:
        await _abort(http, target, finished)
    finished = [*ended, *finished]
    done = time.monotonic()
    tokens = sum(_tokens(s) for s in moved)
    await progress("switched", rounds, tokens)
    return MigrationOutcome(
        len(moved), len(finished), rounds, tokens, rounds_done - started, done - rounds_done,
        done - started,
    )  # fmt: skip
