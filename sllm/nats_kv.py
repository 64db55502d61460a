"""The ``KeyValue`` port on JetStream KV (nats-py): a bucket that survives gateway restarts
(file storage on the server) and, replicated on a cluster, the loss of a server.

When an operation is retried, and when not:
- NATS not connected (the server is down, or this client is moving to another server of the
  cluster): waited for up to ``RECONNECT_GRACE_S`` (a move takes under a second), then
  ``Unavailable`` at once, and nothing is sent later (the gateway's connection buffers nothing:
  a write it gave up on must not land late, issue 14).
- Connected, and JetStream says it cannot take it yet (503, no stream leader: a replicated
  bucket answers nothing for 4-9 s after the server that led it is lost, while Raft elects
  another): retried up to the bucket's ``retry_s`` (``KV_RETRY_S``); the write was not made.
- No answer within ``KV_ATTEMPT_S``: reads, ``put`` and ``delete`` are retried (doing them
  twice changes nothing). ``create`` and ``update`` read the key first: it holds the value
  written (at a newer revision): the write was made; it is as before: it was not, and is
  tried again; anything else: another writer was first (``StaleRevision``).
- A revision condition that fails is ``StaleRevision`` (a ``Conflict``), never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
)
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NoStreamResponseError,
    ServiceUnavailableError,
)

from sllm.bus import Entry, KvEntry
from sllm.errors import StaleRevision, Unavailable

if TYPE_CHECKING:
    from sllm.nats_bus import NatsBus

log = logging.getLogger(__name__)

T = TypeVar("T")

NOT_CONNECTED = "NATS is not connected (the server is down or unreachable)"
# 15 s: a replicated stream whose leader's server is SIGKILLed takes writes again after 4.6 s
# here (nats-server's Raft election timeout is 4-9 s); the worst case with margin.
KV_RETRY_S = 15.0
# One attempt's deadline: a request in flight on a connection that drops is never answered
# (nats-py does not fail it on reconnect), so a short attempt retried beats its default 5 s.
KV_ATTEMPT_S = 1.0
# 1 s: a client whose server died is on another one of the cluster well within it (the socket
# closes at once and nats-py tries the next server without waiting); longer is an outage, and
# the caller hears so (an admin write answers 503 within about a second).
RECONNECT_GRACE_S = 1.0
# JetStream's "temporarily unavailable" answers: 503; error 10008 (no leader yet); and
# error 10005, "no suitable peers for placement" (a 400), which a cluster that has just
# elected its meta leader answers a replicated create until every peer has reported in (a
# gateway started with its cluster exited on it once in a full test run). A peer that stays
# away makes it permanent: the retries end at their deadline with its description.
_RETRY_STATUS = (503,)
_RETRY_ERR_CODES = (10008, 10005)
# Not sent at all (no connection, nobody to take it): retrying cannot make it happen twice.
_NOT_SENT = (
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionReconnectingError,
    OutboundBufferLimitError,
    ConnectionClosedError,
)


class Unanswered(Unavailable):
    """A conditional write got no answer in time: it may or may not have been made."""


def _describe(exc: Exception) -> str:
    """JetStream's own words for an API error (nats-py's repr drops them), else the repr."""
    if isinstance(exc, APIError) and exc.description:
        return f"{type(exc).__name__} {exc.err_code}: {exc.description}"
    return repr(exc)


def _not_taken(exc: Exception) -> bool:
    """JetStream (or the connection) did not take the operation: safe to try again."""
    if isinstance(exc, _NOT_SENT):
        return True
    return isinstance(exc, APIError) and (
        exc.code in _RETRY_STATUS or exc.err_code in _RETRY_ERR_CODES
    )


async def retrying(
    what: str,
    op: Callable[[], Awaitable[T]],
    bus: NatsBus,
    retry_s: float,
    *,
    idempotent: bool = True,
) -> T:
    """Run ``op`` under the rules of the module docstring."""
    deadline = time.monotonic() + retry_s
    delay = 0.05
    away_since: float | None = None
    while True:
        now = time.monotonic()
        if not bus.nc.is_connected:
            away_since = now if away_since is None else away_since
            if now - away_since >= RECONNECT_GRACE_S:
                raise Unavailable(f"{what}: {NOT_CONNECTED}")
            await asyncio.sleep(0.05)
            continue
        away_since = None
        try:
            return await op()
        except KeyWrongLastSequenceError as exc:
            raise StaleRevision(f"{what}: the key moved on ({exc.description})") from None
        except (TimeoutError, NatsTimeout):
            if not idempotent:
                raise Unanswered(f"{what}: JetStream did not answer in time") from None
            reason = "no answer in time"
        except NatsError as exc:
            if not _not_taken(exc):
                raise Unavailable(f"{what}: {_describe(exc)}") from None
            reason = _describe(exc)
        if time.monotonic() + delay > deadline:
            raise Unavailable(f"{what}: NATS did not take it for {retry_s:.0f}s ({reason})")
        log.info("%s: retrying (%s)", what, reason)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


class NatsKeyValue:
    # 1 s: how often a watch looks whether the connection came back meanwhile
    """A JetStream KV bucket as the ``KeyValue`` port, retrying while NATS reconnects."""

    WATCH_POLL_S = 1.0

    def __init__(self, kv: Any, bucket: str, bus: NatsBus, retry_s: float = KV_RETRY_S) -> None:
        self._kv = kv
        self._bucket = bucket
        self._bus = bus
        self._retry_s = retry_s

    async def _do(self, what: str, op: Callable[[], Awaitable[T]], *, idempotent: bool = True) -> T:
        return await retrying(
            f"kv {self._bucket}: {what}", op, self._bus, self._retry_s, idempotent=idempotent
        )

    async def entry(self, key: str) -> Entry | None:
        """``key``'s value and revision, or None."""

        async def op() -> Entry | None:
            try:
                found = await self._kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                return None
            if found.value is None:
                return None
            return Entry(found.value, int(found.revision))

        return await self._do(f"get {key}", op)

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None."""
        found = await self.entry(key)
        return None if found is None else found.value

    async def put(self, key: str, value: bytes) -> int:
        """Write ``key`` whatever its revision; the new revision."""
        revision: int = await self._do(f"put {key}", lambda: self._kv.put(key, value))
        return revision

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it is absent (else ``StaleRevision``)."""
        return await self._conditional(
            f"create {key}", key, value, None, lambda: self._kv.create(key, value)
        )

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Write ``key`` only if its revision is still ``last`` (else ``StaleRevision``)."""
        return await self._conditional(
            f"update {key}", key, value, last, lambda: self._kv.update(key, value, last=last)
        )

    async def _conditional(
        self,
        what: str,
        key: str,
        value: bytes,
        last: int | None,
        write: Callable[[], Awaitable[int]],
    ) -> int:
        """``write`` (a create when ``last`` is None, else an update at ``last``); when it gets
        no answer, the key says whether it was made (see the module docstring)."""
        deadline = time.monotonic() + self._retry_s
        while True:
            try:
                revision: int = await self._do(what, write, idempotent=False)
                return revision
            except Unanswered:
                pass
            found = await self.entry(key)
            if found is not None and found.value == value and found.revision > (last or 0):
                return found.revision  # it was made; only the answer was lost
            as_before = (
                found is None if last is None else (found is not None and found.revision == last)
            )
            if not as_before:
                raise StaleRevision(f"kv {self._bucket}: {what}: another writer was first")
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"kv {self._bucket}: {what}: JetStream did not answer for "
                    f"{self._retry_s:.0f}s; not made"
                )
            log.info("kv %s: %s: not made, trying again", self._bucket, what)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (nothing if it is absent)."""

        async def op() -> None:
            try:
                await self._kv.purge(key)
            except KeyNotFoundError:
                return

        await self._do(f"delete {key}", op)

    async def keys(self) -> list[str]:
        """Every key in the bucket, sorted."""

        async def op() -> list[str]:
            try:
                found: list[str] = await self._kv.keys()
            except NoKeysError:
                return []
            return sorted(found)

        return await self._do("keys", op)

    async def watch(self) -> AsyncIterator[KvEntry | None]:
        """See ``KeyValue.watch``. nats-py's watcher does not resume after the server
        restarted (measured: silent from then on), so this one ends at a reconnect (to the
        same server, or another of the cluster). It also ends when its consumer is lost while
        this client stays connected: the watch's ordered consumer lives on one server of a
        cluster, not necessarily this client's, and nats-py notices its loss only after two
        missed 5 s heartbeats (measured here: a change seen 20 s late). So while no change
        comes, the consumer is asked for every ``WATCH_POLL_S``; no answer within
        ``KV_ATTEMPT_S`` ends the watch, and the caller reads the bucket again (``Registry``
        does)."""
        generation = self._bus.link.reconnects
        watcher = await self._kv.watchall()
        # nats-py keeps the watch's subscription private; its consumer_info is public API
        subscription = getattr(watcher, "_sub", None)
        try:
            while self._bus.link.reconnects == generation:
                try:
                    entry = await watcher.updates(timeout=self.WATCH_POLL_S)
                except (TimeoutError, NatsTimeout):
                    if subscription is not None and not await self._consumer_alive(subscription):
                        return
                    continue
                if entry is None:
                    yield None
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                yield KvEntry(entry.key, None if deleted else entry.value, entry.revision)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _consumer_alive(self, subscription: Any) -> bool:
        try:
            await asyncio.wait_for(subscription.consumer_info(), KV_ATTEMPT_S)
        except Exception as exc:  # no answer, not found, not connected: start again
            log.info("kv %s: the watch's consumer is lost (%r); watching again", self._bucket, exc)
            return False
        return True
