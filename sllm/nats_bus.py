"""NATS adapter of the ``Bus`` and ``KeyValue`` ports (nats-py, JetStream KV)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError

from sllm.bus import Handler, Message, Subscription
from sllm.errors import Unavailable

log = logging.getLogger(__name__)


class _NatsSubscription:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()


class NatsBus:
    """Reconnects forever after an outage (nats-py's own reconnect loop)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    @staticmethod
    async def connect(
        url: str, name: str, connect_timeout_s: float = 5.0, seed_file: str | Path = ""
    ) -> NatsBus:
        """Connect as the identity whose NKey seed is in ``seed_file`` (``sllm.nats_auth``;
        "" connects without credentials, which a server with authorization refuses)."""
        _check_seed_file(seed_file)
        refused = asyncio.Event()

        async def on_disconnect() -> None:
            log.warning("nats disconnected url=%s", url)

        async def on_reconnect() -> None:
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
        if seed_file:
            options["nkeys_seed"] = str(seed_file)
        connecting = asyncio.ensure_future(nc.connect(**options))
        refusal = asyncio.ensure_future(refused.wait())
        await asyncio.wait(
            {connecting, refusal}, timeout=connect_timeout_s * 2, return_when="FIRST_COMPLETED"
        )
        refusal.cancel()
        if connecting.done() and connecting.exception() is None:
            return NatsBus(nc)
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
        await self.nc.publish(subject, payload)

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
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout_s)
        except (TimeoutError, NatsTimeout, NoRespondersError) as exc:
            raise TimeoutError(f"no reply on {subject} within {timeout_s}s ({exc!r})") from None
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
        return NatsKeyValue(kv)


def _check_seed_file(seed_file: str | Path) -> None:
    if seed_file and not Path(seed_file).is_file():
        raise Unavailable(
            f"NATS credentials {seed_file} do not exist (SLLM_NATS_SEED_FILE names this "
            "component's NKey seed file; `sllm nats creds` makes them)"
        )


class NatsKeyValue:
    """JetStream KV bucket: survives gateway restarts (file storage on the server)."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    async def get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        return value

    async def put(self, key: str, value: bytes) -> None:
        await self._kv.put(key, value)

    async def delete(self, key: str) -> None:
        try:
            await self._kv.purge(key)
        except KeyNotFoundError:
            return

    async def keys(self) -> list[str]:
        try:
            found: list[str] = await self._kv.keys()
        except NoKeysError:
            return []
        return sorted(found)
