"""NATS adapter of the ``Bus`` and ``KeyValue`` ports (nats-py, JetStream KV)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)

from sllm.bus import Handler, KvEntry, Message, NoResponder, Subscription
from sllm.errors import Conflict, Unavailable

log = logging.getLogger(__name__)


class _NatsSubscription:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()


NOT_CONNECTED = "NATS is not connected (the server is down or unreachable)"


class _Link:
    """What the connection's callbacks record: how many times it came back."""

    def __init__(self) -> None:
        self.reconnects = 0


class NatsBus:
    """Reconnects forever after an outage (nats-py's own reconnect loop).

    ``buffer``: whether messages published while disconnected are kept and sent on reconnect
    (nats-py's default, 2 MiB). The gateway turns it off: a command or a registry write it
    gave up on must not arrive late (a delete answered 503 and applied when NATS came back
    was issue 14's registry drift); publishing then fails at once instead."""

    def __init__(self, nc: Client, link: _Link | None = None) -> None:
        self.nc = nc
        self.link = link or _Link()

    @staticmethod
    async def connect(
        url: str,
        name: str,
        connect_timeout_s: float = 5.0,
        seed_file: str | Path = "",
        *,
        buffer: bool = True,
    ) -> NatsBus:
        """Connect as the identity whose NKey seed is in ``seed_file`` (``sllm.nats_auth``;
        "" connects without credentials, which a server with authorization refuses)."""
        _check_seed_file(seed_file)
        refused = asyncio.Event()
        link = _Link()

        async def on_disconnect() -> None:
            log.warning("nats disconnected url=%s", url)

        async def on_reconnect() -> None:
            link.reconnects += 1
            log.info("nats reconnected url=%s", url)

        async def on_error(exc: Exception) -> None:
            if "authorization violation" in str(exc).lower():
                refused.set()
            log.warning("nats error: %s", exc)

        # max_reconnect_attempts=-1 also makes nats-py retry the *first* connect forever, so the
        # initial connect gets its own deadline, and ends at once when the server refuses the
        # credentials; after that, reconnects never give up.
        nc = Client()
        options: dict[str, Any] = {
            "servers": [url],
            "name": name,
            "connect_timeout": connect_timeout_s,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
            "error_cb": on_error,
        }
        if not buffer:
            options["pending_size"] = 0
        if seed_file:
            options["nkeys_seed"] = str(seed_file)
        connecting = asyncio.ensure_future(nc.connect(**options))
        refusal = asyncio.ensure_future(refused.wait())
        await asyncio.wait(
            {connecting, refusal}, timeout=connect_timeout_s * 2, return_when="FIRST_COMPLETED"
        )
        refusal.cancel()
        if connecting.done() and connecting.exception() is None:
            return NatsBus(nc, link)
        connecting.cancel()
        reason = (
            "the server refused the credentials (Authorization Violation): check "
            "SLLM_NATS_SEED_FILE and that the server knows this identity"
            if refused.is_set()
            else repr(connecting.exception()) if connecting.done() and not connecting.cancelled()
            else f"no connection within {connect_timeout_s * 2:g}s"
        )  # fmt: skip
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await connecting
        with contextlib.suppress(Exception):
            await nc.close()
        raise Unavailable(f"cannot connect to NATS at {url}: {reason}")

    async def publish(self, subject: str, payload: bytes) -> None:
        try:
            await self.nc.publish(subject, payload)
        except (OutboundBufferLimitError, ConnectionClosedError):
            raise Unavailable(f"cannot publish on {subject}: {NOT_CONNECTED}") from None

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        async def callback(msg: Msg) -> None:
            try:
                reply = await handler(Message(msg.subject, msg.data, msg.reply or None))
            except Exception:
                log.exception("bus handler for %s failed", msg.subject)
                return
            if msg.reply and reply is not None:
                await self.nc.publish(msg.reply, reply)

        sub = await self.nc.subscribe(subject, cb=callback)
        return _NatsSubscription(sub)

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes:
        """Raises ``TimeoutError`` when no reply comes in time, ``NoResponder`` at once when
        nobody listens on ``subject`` and ``Unavailable`` when NATS is not connected."""
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout_s)
        except NoRespondersError:
            raise NoResponder(f"nobody listens on {subject}") from None
        except (TimeoutError, NatsTimeout) as exc:
            raise TimeoutError(f"no reply on {subject} within {timeout_s}s ({exc!r})") from None
        except (OutboundBufferLimitError, ConnectionClosedError):
            raise Unavailable(f"cannot send on {subject}: {NOT_CONNECTED}") from None
        data: bytes = msg.data
        return data

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def key_value(self, bucket: str) -> NatsKeyValue:
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket, history=5)
        return NatsKeyValue(kv, self)


def _check_seed_file(seed_file: str | Path) -> None:
    if seed_file and not Path(seed_file).is_file():
        raise Unavailable(
            f"NATS credentials {seed_file} do not exist (SLLM_NATS_SEED_FILE names this "
            "component's NKey seed file; `sllm nats creds` makes them)"
        )


class NatsKeyValue:
    """JetStream KV bucket: survives gateway restarts (file storage on the server).

    Writes are refused with ``Unavailable`` while the connection is down (never queued for
    later); a write whose answer does not come is ``Unavailable`` too, saying its outcome is
    unknown (a watch then shows whether it was made)."""

    # 1 s: how often a watch looks whether the connection came back meanwhile
    WATCH_POLL_S = 1.0

    def __init__(self, kv: Any, bus: NatsBus) -> None:
        self._kv = kv
        self._bus = bus

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        return value

    async def _write(self, key: str, write: Callable[[], Awaitable[Any]]) -> Any:
        if not self._bus.nc.is_connected:
            raise Unavailable(f"{NOT_CONNECTED}: {key} was not changed")
        try:
            return await write()
        except KeyWrongLastSequenceError:
            raise Conflict(f"{key} was changed meanwhile (by another writer)") from None
        except (TimeoutError, NatsTimeout):
            raise Unavailable(
                f"JetStream did not answer in time: the change of {key} may or may not have "
                "been made"
            ) from None
        except NatsError as exc:
            raise Unavailable(f"{key} was not changed: {exc!r}") from None

    async def put(self, key: str, value: bytes) -> int:
        revision: int = await self._write(key, lambda: self._kv.put(key, value))
        return revision

    async def create(self, key: str, value: bytes) -> int:
        revision: int = await self._write(key, lambda: self._kv.create(key, value))
        return revision

    async def update(self, key: str, value: bytes, last: int) -> int:
        revision: int = await self._write(key, lambda: self._kv.update(key, value, last=last))
        return revision

    async def delete(self, key: str) -> None:
        await self._write(key, lambda: self._kv.purge(key))

    async def keys(self) -> list[str]:
        try:
            found: list[str] = await self._kv.keys()
        except NoKeysError:
            return []
        return sorted(found)

    async def watch(self) -> AsyncIterator[KvEntry | None]:
        """See ``KeyValue.watch``. nats-py's watcher does not resume after the server
        restarted (measured: silent from then on), so this one ends at a reconnect."""
        generation = self._bus.link.reconnects
        watcher = await self._kv.watchall()
        try:
            while self._bus.link.reconnects == generation:
                try:
                    entry = await watcher.updates(timeout=self.WATCH_POLL_S)
                except (TimeoutError, NatsTimeout):
                    continue
                if entry is None:
                    yield None
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                yield KvEntry(entry.key, None if deleted else entry.value, entry.revision)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
