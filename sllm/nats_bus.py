"""NATS adapter of the ``Bus`` port (nats-py); its ``KeyValue`` buckets are in ``sllm.nats_kv``.

A client is given every server URL it knows (``SLLM_NATS_URL``, comma-separated) and learns
the rest of a cluster from the servers; it reconnects across them forever. A lost server is
found at once when its process dies (the socket closes) and within ``PING_INTERVAL_S`` x
``MAX_OUTSTANDING_PINGS`` when it hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError

from sllm.bus import Handler, Message, NoResponder, Subscription
from sllm.errors import Unavailable
from sllm.nats_kv import KV_ATTEMPT_S, KV_RETRY_S, NOT_CONNECTED, NatsKeyValue, retrying
from sllm.settings import as_nats_urls

log = logging.getLogger(__name__)

# 1 s x 3: a hung server (SIGSTOP, a partition) is left for another within ~3 s, not nats-py's
# default 2 minutes x 2. The cost is one PING a second per client.
PING_INTERVAL_S = 1.0
MAX_OUTSTANDING_PINGS = 3
# Closing: how long draining the connection may take, then a plain close as long again.
CLOSE_S = 5.0
# 2 s: how long a request with nobody listening is sent again before it is ``NoResponder``. A
# responder whose server of the cluster died listens again from another within a second;
# one that is not running does not, and its requester hears so 2 s later rather than at once.
NO_RESPONDER_GRACE_S = 2.0


class _NatsSubscription:
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()


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
        urls: str | Sequence[str],
        name: str,
        connect_timeout_s: float = 5.0,
        seed_file: str | Path = "",
        *,
        buffer: bool = True,
    ) -> NatsBus:
        """Connect to any of ``urls`` (a list, or one string of comma-separated URLs:
        SLLM_NATS_URL's form) as the identity whose NKey seed is in ``seed_file``
        (``sllm.nats_auth``; "" connects without credentials, which a server with
        authorization refuses)."""
        servers = list(as_nats_urls(urls) if isinstance(urls, str) else urls)
        url = ",".join(servers)
        _check_seed_file(seed_file)
        refused = asyncio.Event()
        link = _Link()
        nc = Client()

        async def on_disconnect() -> None:
            log.warning("nats disconnected servers=%s", url)

        async def on_reconnect() -> None:
            link.reconnects += 1
            now = nc.connected_url
            log.info("nats reconnected to %s", now.netloc if now else "?")

        async def on_error(exc: Exception) -> None:
            if "authorization violation" in str(exc).lower():
                refused.set()
            log.warning("nats error: %s", exc)

        # max_reconnect_attempts=-1 also makes nats-py retry the *first* connect forever, so the
        # initial connect gets its own deadline, and ends at once when the server refuses the
        # credentials; after that, reconnects never give up.
        options: dict[str, Any] = {
            "servers": servers,
            "name": name,
            "connect_timeout": connect_timeout_s,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "ping_interval": PING_INTERVAL_S,
            "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
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
        """Publish ``payload`` on ``subject`` (``Unavailable`` if NATS is down)."""
        try:
            await self.nc.publish(subject, payload)
        except (OutboundBufferLimitError, ConnectionClosedError):
            raise Unavailable(f"cannot publish on {subject}: {NOT_CONNECTED}") from None

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """Call ``handler`` for each message on ``subject``; a reply it returns is sent back."""

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
        """Raises ``TimeoutError`` when no reply comes in time, ``NoResponder`` when nobody
        listens on ``subject`` for ``NO_RESPONDER_GRACE_S`` (sent again meanwhile: nobody
        received it, so that is safe) and ``Unavailable`` when NATS is not connected."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise NatsTimeout
                msg = await self.nc.request(subject, payload, timeout=remaining)
            except NoRespondersError:
                waited = time.monotonic() - started
                if waited + 0.1 >= min(NO_RESPONDER_GRACE_S, timeout_s):
                    raise NoResponder(f"nobody listens on {subject}") from None
                await asyncio.sleep(0.1)
                continue
            except (TimeoutError, NatsTimeout) as exc:
                raise TimeoutError(f"no reply on {subject} within {timeout_s}s ({exc!r})") from None
            except (OutboundBufferLimitError, ConnectionClosedError):
                raise Unavailable(f"cannot send on {subject}: {NOT_CONNECTED}") from None
            data: bytes = msg.data
            return data

    async def close(self) -> None:
        """Drain and close the connection, within ``CLOSE_S`` twice over: a drain that cannot
        finish (its server lost meanwhile: nats-py waits on the flush of a dead connection,
        or refuses while reconnecting) gives way to a plain close, and a close that cannot
        finish either is left behind with a warning. A process stopping must not hang here."""
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), CLOSE_S)
            return
        except (TimeoutError, NatsError) as exc:
            log.warning("nats drain did not finish (%s): closing", type(exc).__name__)
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.close(), CLOSE_S)
        except (TimeoutError, NatsError) as exc:
            log.warning("nats close did not finish (%s): left behind", type(exc).__name__)

    async def key_value(
        self,
        bucket: str,
        *,
        replicas: int = 1,
        ttl_s: float | None = None,
        history: int = 5,
        retry_s: float = KV_RETRY_S,
    ) -> NatsKeyValue:
        """Open ``bucket``, creating it with ``replicas`` copies (one per server of a cluster,
        up to 5) and, with ``ttl_s``, a maximum age per value. A bucket that exists with other
        replicas or TTL is updated to these (JetStream moves the replicas), so a registry made
        on one server follows it onto a cluster. ``retry_s``: how long its operations wait out
        a JetStream election (``sllm.nats_kv``); opening it waits at least ``KV_RETRY_S``."""
        js = self.nc.jetstream(timeout=KV_ATTEMPT_S)
        config = KeyValueConfig(bucket=bucket, history=history, replicas=replicas, ttl=ttl_s)

        async def open_bucket() -> Any:
            try:
                kv = await js.key_value(bucket)
            except BucketNotFoundError:
                return await js.create_key_value(config)
            info = await js.stream_info(f"KV_{bucket}")
            want_age = ttl_s or 0.0
            have_age = info.config.max_age or 0.0
            if info.config.num_replicas != replicas or abs(have_age - want_age) > 1e-3:
                log.info(
                    "kv %s: replicas %s -> %s, ttl %s -> %s",
                    bucket, info.config.num_replicas, replicas, have_age, want_age,
                )  # fmt: skip
                info.config.num_replicas = replicas
                info.config.max_age = want_age
                await js.update_stream(info.config)
            return kv

        # Opening waits out an election as long as any bucket's operations may (KV_RETRY_S): a
        # gateway started with a cluster that is still electing (seen in a full test run: the
        # lease bucket, whose operations retry 1 s, failed to open) must not give up at once.
        kv = await retrying(f"open kv bucket {bucket}", open_bucket, self, max(retry_s, KV_RETRY_S))
        return NatsKeyValue(kv, bucket, self, retry_s)


def _check_seed_file(seed_file: str | Path) -> None:
    if seed_file and not Path(seed_file).is_file():
        raise Unavailable(
            f"NATS credentials {seed_file} do not exist (SLLM_NATS_SEED_FILE names this "
            "component's NKey seed file; `sllm nats creds` makes them)"
        )
