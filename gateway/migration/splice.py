"""Stream splicing: one client stream across a live migration (no I/O of its own).

An instance ends the stream of a request it handed to another instance with a ``migrated``
event carrying the request's final state (every token it sent, nothing more). ``follow_moves``
passes events through as they come, swallows that event, opens the continuation through
``resume`` and passes its events on: the client sees one stream, with no token lost and none
repeated, whatever API shape is built on top of it (native or OpenAI SSE).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.sse import EventSplitter, event_data
from sllm.errors import SllmError

Resume = Callable[[dict[str, Any]], Awaitable[AsyncIterator[bytes]]]
"""Given the ``migrated`` event's body, the resumed request's event stream (bytes)."""

# A request moved more often than this within one stream is bouncing between instances.
MAX_MOVES = 8


def migrated_body(event: bytes) -> dict[str, Any] | None:
    """The body of a ``migrated`` event, or None for any other event."""
    if b'"migrated"' not in event:  # cheap test first: every token event passes here
        return None
    data = event_data(event)
    if data is None:
        return None
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    moved = payload.get("migrated") if isinstance(payload, dict) else None
    if not isinstance(moved, dict) or not isinstance(moved.get("state"), dict):
        return None
    return moved


def error_event(code: str, message: str) -> bytes:
    return f"data: {json.dumps({'error': {'code': code, 'message': message}})}\n\n".encode()


async def follow_moves(
    first: bytes, rest: AsyncIterator[bytes], resume: Resume
) -> AsyncIterator[bytes]:
    """The bytes of ``first`` + ``rest``, continued across every move of the request. A
    continuation that cannot be opened ends the stream with a ``migration_failed`` error."""
    stream = _prepend(first, rest)
    for _ in range(MAX_MOVES + 1):
        splitter = EventSplitter()
        moved: dict[str, Any] | None = None
        async for chunk in stream:
            out: list[bytes] = []
            for event in splitter.feed(chunk):
                moved = migrated_body(event)
                if moved is not None:
                    break
                out.append(event)
            if out:
                yield b"".join(out)
            if moved is not None:
                break
        if moved is None:
            tail = splitter.rest()
            if tail:
                yield tail
            return
        try:
            stream = await resume(moved)
        except SllmError as exc:
            yield error_event("migration_failed", exc.message)
            return
    yield error_event("migration_failed", f"the request moved more than {MAX_MOVES} times")


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk
