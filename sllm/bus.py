"""The ``Bus`` port (publish, subscribe, request-reply) and the ``KeyValue`` port (the
function registry), with in-memory adapters for unit tests. The NATS adapter is in
``sllm.nats_bus``."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sllm.errors import StaleRevision, Unavailable


@dataclass
class Message:
    """A message received on a subject (``reply_to`` set for a request)."""

    subject: str
    data: bytes
    reply_to: str | None = None


Handler = Callable[[Message], Awaitable[bytes | None]]
"""A subscriber. For a request, the returned bytes are sent back as the reply."""


class Subscription(Protocol):
    """A live subscription; ``unsubscribe`` ends it."""

    async def unsubscribe(self) -> None:
        """Stop receiving messages on this subscription."""


class NoResponder(TimeoutError):
    """A request found nobody subscribed to its subject (known at once, not after the
    timeout): for a node's command subject, the node is not running."""


class Bus(Protocol):
    """The message bus port (NATS in production, ``MemoryBus`` in unit tests)."""

    async def publish(self, subject: str, payload: bytes) -> None:
        """Send ``payload`` on ``subject`` to whoever subscribes, without waiting."""

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """``subject`` may use NATS wildcards (``*`` one token, ``>`` the rest)."""
        ...

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        """Send and wait for one reply; raises ``TimeoutError`` when none comes in time
        (``NoResponder``, a subclass, when nobody listens) and ``Unavailable`` when the bus
        is not connected."""
        ...

    async def close(self) -> None:
        """Drop the connection and every subscription."""


@dataclass(frozen=True)
class Entry:
    """A key's value and its revision (JetStream: the stream sequence of the write; it only
    grows, across every key of a bucket)."""

    value: bytes
    revision: int


@dataclass(frozen=True)
class KvEntry:
    """One key's state as a watch reports it: ``value`` None means deleted. ``revision``
    increases with every write to the bucket (JetStream's stream sequence)."""

    key: str
    value: bytes | None
    revision: int


class KeyValue(Protocol):
    """A bucket of keys. Writes raise ``Unavailable`` when the bucket cannot be reached (and
    are then not made, not even later) and ``StaleRevision`` (a ``Conflict``) when a condition
    fails."""

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None if there is none."""

    async def put(self, key: str, value: bytes) -> int:
        """Write ``value``; returns the new revision."""
        ...

    async def entry(self, key: str) -> Entry | None:
        """The value with its revision (None when the key has none)."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Write ``value`` only if ``key`` has no value; the new revision (``StaleRevision``
        otherwise)."""
        ...

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write ``value`` only if ``key``'s revision is still ``last``; the new revision
        (``StaleRevision`` otherwise)."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` (nothing if it is absent)."""

    async def keys(self) -> list[str]:
        """Every key in the bucket, sorted."""

    def watch(self) -> AsyncIterator[KvEntry | None]:
        """Every key's current entry, then ``None`` (the snapshot is complete), then each
        change as it is made. It ends when the connection to the bucket was lost and found
        again: changes may have been missed, so the caller starts a new watch."""
        ...


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches a NATS ``pattern`` (``*`` one token, ``>`` the rest)."""
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
        """Deliver ``payload`` to every matching subscriber's handler."""
        self.published.append(Message(subject, payload))
        for pattern, handler in list(self._subs):
            if subject_matches(pattern, subject):
                await handler(Message(subject, payload))

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """Call ``handler`` for every message on subjects matching ``subject``."""
        entry = (subject, handler)
        self._subs.append(entry)
        return _MemorySubscription(self, entry)

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        """The first matching subscriber's reply; ``NoResponder`` if none replies."""
        for pattern, handler in list(self._subs):
            if subject_matches(pattern, subject):
                reply = await asyncio.wait_for(
                    handler(Message(subject, payload, reply_to="_INBOX")), timeout_s
                )
                if reply is not None:
                    return reply
        raise NoResponder(f"no responder on {subject}")

    async def close(self) -> None:
        """Drop every subscription."""
        self._subs.clear()


class MemoryKeyValue:
    """In-process bucket with revisions and watches, for unit tests. ``down = True`` makes
    every write fail as an unreachable bucket's would."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        self._watchers: list[asyncio.Queue[KvEntry]] = []
        self.down = False

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None."""
        found = self._data.get(key)
        return found[0] if found else None

    def revision_of(self, key: str) -> int:
        """The revision of ``key`` (0: absent)."""
        found = self._data.get(key)
        return found[1] if found else 0

    async def entry(self, key: str) -> Entry | None:
        """``key``'s value and revision, or None."""
        found = self._data.get(key)
        return Entry(*found) if found else None

    def _write(self, key: str, value: bytes | None) -> int:
        if self.down:
            raise Unavailable("the bucket is unreachable: the change was not made")
        self._revision += 1
        if value is None:
            self._data.pop(key, None)
        else:
            self._data[key] = (value, self._revision)
        for queue in self._watchers:
            queue.put_nowait(KvEntry(key, value, self._revision))
        return self._revision

    async def put(self, key: str, value: bytes) -> int:
        """Write ``key`` whatever its revision; the new revision."""
        return self._write(key, value)

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it is absent (else ``StaleRevision``)."""
        if key in self._data:
            raise StaleRevision(f"key {key!r} already exists (revision {self.revision_of(key)})")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write ``key`` only if its revision is still ``last`` (else ``StaleRevision``)."""
        if self.revision_of(key) != last:
            raise StaleRevision(f"key {key!r} changed since revision {last}")
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (a watch sees its value as None)."""
        if key in self._data:
            self._write(key, None)

    async def keys(self) -> list[str]:
        """Every key, sorted."""
        return sorted(self._data)

    async def watch(self) -> AsyncIterator[KvEntry | None]:
        """Every key's entry (sorted), then None, then each change as it is written."""
        queue: asyncio.Queue[KvEntry] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            for key, (value, revision) in sorted(self._data.items()):
                yield KvEntry(key, value, revision)
            yield None
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)
