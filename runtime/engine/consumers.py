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


def raise_for(event: ErrorEvent) -> None:
    status = 503 if event.code == "unavailable" else 500
    raise SllmError(event.message, code=event.code, status=status)


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


def completion_body(request_id: str, text: str, finish: FinishEvent) -> dict[str, Any]:
    return {
        "id": request_id,
        "text": text,
        "finish_reason": finish.finish_reason,
        "usage": finish.usage(),
    }


async def generate(engine: Backend, state: RequestState) -> dict[str, Any]:
    """Run ``state`` to the end; the non-streaming response body."""
    parts: list[str] = []
    async for event in aiter_events(engine, state):
        if isinstance(event, TokenEvent):
            parts.append(event.delta)
        elif isinstance(event, FinishEvent):
            return completion_body(state.request_id, "".join(parts), event)
        else:
            raise_for(event)
    raise SllmError("generation ended without a finish event")


def generate_blocking(engine: Backend, state: RequestState) -> dict[str, Any]:
    parts: list[str] = []
    for event in iter_events(engine, state):
        if isinstance(event, TokenEvent):
            parts.append(event.delta)
        elif isinstance(event, FinishEvent):
            return completion_body(state.request_id, "".join(parts), event)
        else:
            raise_for(event)
    raise SllmError("generation ended without a finish event")
