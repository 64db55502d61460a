"""Consuming a request's events: on an event loop (the HTTP server) or on a worker thread (a
custom handler's blocking ``ctx.generate``). Both cancel the request in the engine when the
consumer stops early (client gone, generator closed)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

from runtime.backend.base import Backend
from runtime.engine.request import ErrorEvent, Event, FinishEvent, RequestState, TokenEvent
from sllm.errors import SllmError

_STATUS = {"unavailable": 503, "invalid_input": 400}


def raise_for(event: Event) -> None:
    if isinstance(event, ErrorEvent):
        raise SllmError(event.message, code=event.code, status=_STATUS.get(event.code, 500))


async def aiter_events(engine: Backend, state: RequestState) -> AsyncIterator[Event]:
    """Submit ``state`` and yield its events until (and including) the finish or error."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    engine.submit(state, sink)
    done = False
    try:
        while not done:
            event = await events.get()
            done = isinstance(event, FinishEvent | ErrorEvent)
            yield event
    finally:
        if not done:
            engine.cancel(state.request_id)


def iter_events(engine: Backend, state: RequestState, timeout_s: float = 3600.0) -> Iterator[Event]:
    """Blocking version of ``aiter_events`` for worker threads."""
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(state, events.put)
    done = False
    try:
        while not done:
            event = events.get(timeout=timeout_s)
            done = isinstance(event, FinishEvent | ErrorEvent)
            yield event
    finally:
        if not done:
            engine.cancel(state.request_id)


class _Answer:
    """Collects a request's events into the non-streaming response body."""

    def __init__(self, state: RequestState) -> None:
        self.state = state
        self.parts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def add(self, event: Event) -> dict[str, Any] | None:
        if isinstance(event, TokenEvent):
            self.parts.append(event.delta)
            self.logprobs.extend(event.logprobs or ())
            return None
        if isinstance(event, FinishEvent):
            body: dict[str, Any] = {
                "id": self.state.request_id,
                "text": "".join(self.parts),
                "finish_reason": event.finish_reason,
                "usage": event.usage(),
            }
            if self.state.params.logprobs is not None:
                body["logprobs"] = self.logprobs
            return body
        raise_for(event)
        raise AssertionError("unreachable")


async def generate(engine: Backend, state: RequestState) -> dict[str, Any]:
    """Run ``state`` to the end; the non-streaming response body."""
    answer = _Answer(state)
    async for event in aiter_events(engine, state):
        body = answer.add(event)
        if body is not None:
            return body
    raise SllmError("generation ended without a finish event")


def generate_blocking(engine: Backend, state: RequestState) -> dict[str, Any]:
    answer = _Answer(state)
    for event in iter_events(engine, state):
        body = answer.add(event)
        if body is not None:
            return body
    raise SllmError("generation ended without a finish event")
