"""The ``Bus`` port (publish, subscribe, request-reply) and the ``KeyValue`` port (the
function registry), with in-memory adapters for unit tests. The NATS adapter is in
``sllm.nats_bus``."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Message:
    subject: str
    data: bytes
    reply_to: str | None = None


Handler = Callable[[Message], Awaitable[bytes | None]]
"""A subscriber. For a request, the returned bytes are sent back as the reply."""


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Bus(Protocol):
    async def publish(self, subject: str, payload: bytes) -> None: ...

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """``subject`` may use NATS wildcards (``*`` one token, ``>`` the rest)."""
        ...

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        """Send and wait for one reply; raises ``TimeoutError`` when none comes in time."""
        ...

    async def close(self) -> None: ...


class KeyValue(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def keys(self) -> list[str]: ...


def subject_matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and not fnmatch.fnmatchcase(s[i], token)):
            return False
    return len(p) == len(s)


class _MemorySubscription:
    def __init__(self, bus: MemoryBus, entry: tuple[str, Handler]) -> None:
        self._bus, self._entry = bus, entry

    async def unsubscribe(self) -> None:
        if self._entry in self._bus._subs:
            self._bus._subs.remove(self._entry)


class MemoryBus:
    """In-process bus with NATS subject semantics, for unit tests of pure wiring."""

    def __init__(self) -> None:
        self._subs: list[tuple[str, Handler]] = []
        self.published: list[Message] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append(Message(subject, payload))
        for pattern, handler in list(self._subs):
            if subject_matches(pattern, subject):
                await handler(Message(subject, payload))

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        entry = (subject, handler)
        self._subs.append(entry)
        return _MemorySubscription(self, entry)

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        for pattern, handler in list(self._subs):
            if subject_matches(pattern, subject):
                reply = await asyncio.wait_for(
                    handler(Message(subject, payload, reply_to="_INBOX")), timeout_s
                )
                if reply is not None:
                    return reply
        raise TimeoutError(f"no responder on {subject}")

    async def close(self) -> None:
        self._subs.clear()


class MemoryKeyValue:
    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self._data[key] = value

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def keys(self) -> list[str]:
        return sorted(self._data)
