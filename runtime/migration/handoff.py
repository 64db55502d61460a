"""Source side of a live migration: which requests may move, and the switch itself.

Only streamed requests move: the gateway splices a client's stream from the source to the
target, while a JSON answer cannot be spliced (those finish here while the source drains).
At the switch a moving request is cancelled between two decoding steps; its stream then ends
with a ``Handoff`` instead of a finish: the request's final state (every token the client has
been sent, nothing more) and the target that continues it. The gateway reads that event,
resumes the state on the target and carries on the same client stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from runtime.backend.base import Backend
from runtime.engine.consumers import aiter_events
from runtime.engine.request import Event, FinishEvent, RequestState


@dataclass(frozen=True)
class Target:
    instance_id: str
    address: str


@dataclass(frozen=True)
class Handoff:
    """The last event of a stream whose request moved to ``target``."""

    state: dict[str, Any]
    target: Target

    def payload(self) -> dict[str, Any]:
        """The ``migrated`` stream event (the gateway consumes it; clients never see it)."""
        return {
            "migrated": {
                "request_id": self.state["request_id"],
                "target_instance_id": self.target.instance_id,
                "target_address": self.target.address,
                "state": self.state,
            }
        }


class MigrationHub:
    """One per engine, built with the instance service (``runtime.instance.server``): the
    streamed requests, pending switches, and the target-side stager."""

    def __init__(self, engine: Backend) -> None:
        self.engine = engine
        self.stager = engine.new_stager(time.monotonic)
        self.streams: set[str] = set()
        self._switching: dict[str, tuple[Target, asyncio.Future[dict[str, Any] | None]]] = {}

    def migratable(self) -> list[dict[str, Any]]:
        """Exported states of the in-flight streamed requests."""
        return [s for s in self.engine.snapshots() if s["request_id"] in self.streams]

    async def handoff(
        self, request_ids: list[str], target: Target, timeout_s: float
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Stop ``request_ids`` here and hand them to ``target``. Returns (final states of the
        moved requests, ids that finished here first or were unknown)."""
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        for rid in dict.fromkeys(request_ids):
            if rid in self.streams and rid not in self._switching:
                future: asyncio.Future[dict[str, Any] | None] = loop.create_future()
                self._switching[rid] = (target, future)
                waiting[rid] = future
                self.engine.cancel(rid)
        if waiting:
            # A cancel takes effect between two decoding steps (milliseconds to a few tenths).
            await asyncio.wait(waiting.values(), timeout=timeout_s)
        moved: list[dict[str, Any]] = []
        for rid, future in waiting.items():
            final = future.result() if future.done() else None
            if final is not None:
                moved.append(final)
            self._switching.pop(rid, None)
        moved_ids = {s["request_id"] for s in moved}
        return moved, [rid for rid in request_ids if rid not in moved_ids]

    def _take_switch(self, rid: str, state: RequestState) -> Handoff | None:
        entry = self._switching.pop(rid, None)
        if entry is None:
            return None
        target, future = entry
        final = state.export()
        if not future.done():
            future.set_result(final)
        return Handoff(final, target)

    def _ended(self, rid: str) -> None:
        self.streams.discard(rid)
        entry = self._switching.pop(rid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(None)  # finished here before the switch: nothing to move

    async def events(self, state: RequestState) -> AsyncIterator[Event | Handoff]:
        """``aiter_events`` for a streamed request that live migration may move: the same
        events, except that a request switched to another instance ends with a ``Handoff``."""
        rid = state.request_id
        # a duplicate id is refused by submit: leave the other be; a request whose sampling
        # state a resume cannot rebuild (SamplingParams.movable) finishes here, as a JSON
        # answer does
        owner = rid not in self.streams and state.params.movable
        if owner:
            self.streams.add(rid)
        try:
            async for event in aiter_events(self.engine, state):
                if isinstance(event, FinishEvent) and event.finish_reason == "cancelled":
                    moved = self._take_switch(rid, state)
                    if moved is not None:
                        yield moved
                        return
                yield event
        finally:
            if owner:
                self._ended(rid)
