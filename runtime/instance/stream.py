"""The Instance API's event stream for a generation (``/v1/generate`` with ``"stream": true``
and ``/v1/migration/resume``): token batches, then the finish and ``[DONE]``; or, when live
migration moves the request mid-stream, a last ``migrated`` event (``runtime.migration``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from runtime.engine.consumers import raise_for
from runtime.engine.request import ErrorEvent, FinishEvent, RequestState, TokenEvent
from runtime.instance.http import DONE, sse
from runtime.migration.handoff import Handoff, MigrationHub


async def event_stream(hub: MigrationHub, state: RequestState) -> AsyncIterator[bytes]:
    """The events of ``state``'s generation on ``hub``'s engine, as SSE bytes. An error
    before any other event (the engine refused the request) is raised, not sent, so the
    route answers it with its status."""
    started = False
    async for event in hub.events(state):
        if isinstance(event, ErrorEvent) and not started:
            raise_for(event)
        started = True
        if isinstance(event, TokenEvent):
            payload: dict[str, Any] = {"delta": event.delta, "token_ids": event.token_ids}
            if event.logprobs is not None:
                payload["logprobs"] = event.logprobs
            yield sse(payload)
        elif isinstance(event, FinishEvent):
            yield sse({"finish_reason": event.finish_reason, "usage": event.usage()})
            yield DONE
        elif isinstance(event, Handoff):
            yield sse(event.payload())
        else:
            yield sse({"error": {"code": event.code, "message": event.message}})


async def started(hub: MigrationHub, state: RequestState) -> AsyncIterator[bytes]:
    """``event_stream`` with the request already submitted (its first event awaited), so a
    refusal is raised here and still answers a JSON error status, not a 200 stream."""
    events = event_stream(hub, state)
    first = await anext(events)
    return _prepend(first, events)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
