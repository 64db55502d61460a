"""Server-sent events on the wire (pure): cutting a byte stream into whole events, reading an
event's ``data`` lines, and writing one. The proxy's stream splicing and the OpenAI
translation both read events through these, so they agree on where an event ends."""

from __future__ import annotations

import json
from typing import Any

# An event ends at a blank line; instances write "\n\n", a proxy in between may write CRLF.
_SEPARATORS = (b"\n\n", b"\r\n\r\n")


class EventSplitter:
    """Cuts a byte stream into whole server-sent events, each kept byte for byte."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes (with their separator); a partial one is kept."""
        self._buffer += chunk
        events: list[bytes] = []
        while True:
            cut = _event_end(self._buffer)
            if cut < 0:
                return events
            events.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def rest(self) -> bytes:
        """What came after the last whole event (the stream ended mid-event)."""
        rest, self._buffer = self._buffer, b""
        return rest


def _event_end(buffer: bytes) -> int:
    ends = [i + len(sep) for sep in _SEPARATORS if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else -1


def event_data(event: bytes) -> bytes | None:
    """An event's ``data`` lines joined by newlines (the SSE rule), or None if it has none."""
    lines = event.replace(b"\r\n", b"\n").split(b"\n")
    data = [line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def sse(payload: dict[str, Any] | str) -> bytes:
    """One event whose data is ``payload`` (a string as is, else compact JSON)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
