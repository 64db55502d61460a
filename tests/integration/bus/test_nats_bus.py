"""The NATS adapter against the real server, with the platform's credentials: request-reply
between the gateway role and a node, KV persistence; a connection without (or with unknown)
credentials is refused, and a node's credentials cannot publish as another node, receive its
commands or read other nodes' heartbeats."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from sllm.bus import Message
from sllm.errors import Unavailable
from sllm.messages import GATEWAY_LOAD_SUBJECT
from sllm.nats_auth import NatsCredentials, new_seed
from sllm.nats_bus import CLOSE_S, NatsBus
from sllm_cli.servers import ManagedServer, nats_client_env, start_nats

T = TypeVar("T")


def node_seed(server: ManagedServer, node_id: str) -> str:
    return nats_client_env(server, node_id)["SLLM_NATS_SEED_FILE"]


async def first_arrival(
    send: Callable[[], Awaitable[None]], queue: asyncio.Queue[T], server: ManagedServer
) -> T:
    """Send, again every 0.5 s, until something arrives in ``queue``; return the first arrival.

    Sent again because nats-server (2.15) sometimes drops the first message that matches a
    subscription made just after it reloaded its authorization, which each new node identity
    here makes it do: 10 of 300 tries in a loop of reload, subscribe, publish 20 messages
    lost message 0 and no other. Each send is the same message, so a check that what arrives
    first is this message still holds: anything sent before it on the same connection would
    have arrived first."""
    for _ in range(10):
        await send()
        try:
            return await asyncio.wait_for(queue.get(), 0.5)
        except TimeoutError:
            continue
    raise AssertionError(f"nothing arrived in 5 s of sending:\n{server.log_tail(20)}")


async def test_request_reply_and_publish(
    nats_server: ManagedServer, nats_url: str, nats_seed: str
) -> None:
    gateway = await NatsBus.connect(nats_url, "test-gateway", seed_file=nats_seed)
    node = await NatsBus.connect(nats_url, "n1", seed_file=node_seed(nats_server, "bus-n1"))
    received: list[bytes] = []

    async def handler(msg: Message) -> bytes | None:
        received.append(msg.data)
        return b"ack:" + msg.data if msg.reply_to else None

    await node.subscribe("sllm.node.bus-n1.cmd", handler)
    await node.nc.flush()
    assert await gateway.request("sllm.node.bus-n1.cmd", b"load", 2.0) == b"ack:load"
    with pytest.raises(TimeoutError, match=r"nobody listens on sllm\.node\.nobody\.cmd"):
        await gateway.request("sllm.node.nobody.cmd", b"x", 0.3)
    await gateway.close()
    await node.close()
    assert received == [b"load"]


async def test_key_value_survives_reconnect(nats_url: str, nats_seed: str) -> None:
    bus = await NatsBus.connect(nats_url, "kv-writer", seed_file=nats_seed)
    kv = await bus.key_value("test_registry")
    await kv.put("fn.chat", b"v1")
    await bus.close()

    bus2 = await NatsBus.connect(nats_url, "kv-reader", seed_file=nats_seed)
    kv2 = await bus2.key_value("test_registry")
    assert await kv2.get("fn.chat") == b"v1"
    assert "fn.chat" in await kv2.keys()
    await kv2.delete("fn.chat")
    assert await kv2.get("fn.chat") is None
    await bus2.close()


async def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await NatsBus.connect("nats://127.0.0.1:1", "x", connect_timeout_s=0.5)


async def test_connections_without_known_credentials_are_refused(
    nats_url: str, tmp_path: object
) -> None:
    with pytest.raises(Unavailable, match="refused the credentials"):
        await NatsBus.connect(nats_url, "anonymous", connect_timeout_s=2.0)
    from pathlib import Path

    stranger = Path(str(tmp_path)) / "stranger.nk"
    stranger.write_text(new_seed())
    with pytest.raises(Unavailable, match="refused the credentials"):
        await NatsBus.connect(nats_url, "stranger", connect_timeout_s=2.0, seed_file=stranger)
    with pytest.raises(Unavailable, match="do not exist"):
        await NatsBus.connect(nats_url, "typo", seed_file=Path(str(tmp_path)) / "missing.nk")


async def test_a_node_cannot_act_as_another(
    nats_server: ManagedServer, nats_url: str, nats_seed: str
) -> None:
    """Each check is closed by a message the node may send: NATS keeps one connection's
    messages in order, so once it arrives, a forged one sent before it would have too."""
    gateway = await NatsBus.connect(nats_url, "gw", seed_file=nats_seed)
    node_a = await NatsBus.connect(nats_url, "a", seed_file=node_seed(nats_server, "bus-a"))
    node_b = await NatsBus.connect(nats_url, "b", seed_file=node_seed(nats_server, "bus-b"))
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def record(msg: Message) -> None:
        await seen.put(f"{msg.subject} {msg.data.decode()}")

    try:
        await gateway.subscribe("sllm.node.*.heartbeat", record)
        await gateway.nc.flush()
        # a heartbeat or event on node b's subjects, from node a: dropped by the server
        await node_a.publish("sllm.node.bus-b.heartbeat", b"forged")
        await node_a.publish("sllm.node.bus-b.event", b"forged")
        own = await first_arrival(
            lambda: node_a.publish("sllm.node.bus-a.heartbeat", b"own"), seen, nats_server
        )
        assert own == "sllm.node.bus-a.heartbeat own"

        # node a cannot take node b's commands: nobody answers them while b is away
        async def answer(msg: Message) -> bytes:
            return b"from a"

        await node_a.subscribe("sllm.node.bus-b.cmd", answer)
        await node_a.nc.flush()
        with pytest.raises(TimeoutError):
            await gateway.request("sllm.node.bus-b.cmd", b"load", 0.5)

        # nor read other nodes' heartbeats (they carry instance secrets): what node a receives
        # next is its own command, sent after node b's heartbeat went through the server
        at_a: asyncio.Queue[str] = asyncio.Queue()

        async def record_at_a(msg: Message) -> None:
            await at_a.put(msg.subject)

        await node_a.subscribe("sllm.node.*.heartbeat", record_at_a)
        await node_a.subscribe("sllm.node.bus-a.cmd", record_at_a)
        await node_a.nc.flush()
        heartbeat = await first_arrival(
            lambda: node_b.publish("sllm.node.bus-b.heartbeat", b"secret-bearing"),
            seen,
            nats_server,
        )
        assert heartbeat == "sllm.node.bus-b.heartbeat secret-bearing"
        after = await first_arrival(
            lambda: gateway.publish("sllm.node.bus-a.cmd", b"after"), at_a, nats_server
        )
        assert after == "sllm.node.bus-a.cmd"
    finally:
        for bus in (gateway, node_a, node_b):
            await bus.close()


async def test_gateways_share_load_reports_and_a_node_cannot_forge_one(
    nats_server: ManagedServer, nats_url: str, nats_seed: str
) -> None:
    """The leader sums every gateway's in-flight counts (gateway.load_reports): gateways may
    publish and read them; a node's identity may not publish one (it would steer scaling)."""
    leader = await NatsBus.connect(nats_url, "gw-leader", seed_file=nats_seed)
    other = await NatsBus.connect(nats_url, "gw-other", seed_file=nats_seed)
    node = await NatsBus.connect(nats_url, "n", seed_file=node_seed(nats_server, "bus-load"))
    seen: asyncio.Queue[bytes] = asyncio.Queue()

    async def record(msg: Message) -> None:
        await seen.put(msg.data)

    try:
        await leader.subscribe(GATEWAY_LOAD_SUBJECT, record)
        await leader.nc.flush()
        await node.publish(GATEWAY_LOAD_SUBJECT, b"forged")
        # the flush's PONG means the server has handled the forged one (delivered or dropped),
        # so if it let it through, the leader would receive it before the report sent next
        await node.nc.flush()
        report = await first_arrival(
            lambda: other.publish(GATEWAY_LOAD_SUBJECT, b"report"), seen, nats_server
        )
        assert report == b"report"
    finally:
        for bus in (leader, other, node):
            await bus.close()


async def test_closing_while_the_server_is_stopped_does_not_hang(tmp_path: Path) -> None:
    """A gateway or node stopping while its NATS server hangs (SIGSTOP) still closes: the
    drain gives way to a plain close after ``CLOSE_S``, and that close ends as well. nats-py's
    own drain waited 30 s on the subscriptions and then raised from its flush, never closing."""
    creds = NatsCredentials(tmp_path / "creds")
    creds.gateway()
    server = start_nats(tmp_path, credentials=creds)
    try:
        bus = await NatsBus.connect(
            f"nats://127.0.0.1:{server.ports['client']}", "closing",
            seed_file=nats_client_env(server)["SLLM_NATS_SEED_FILE"],
        )  # fmt: skip

        async def handler(msg: Message) -> bytes | None:
            return None

        await bus.subscribe("sllm.gateway.test", handler)
        await bus.nc.flush()
        server.process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            await asyncio.wait_for(bus.close(), 3 * CLOSE_S)
            assert time.monotonic() - began < 2 * CLOSE_S + 1.0
            assert bus.nc.is_closed
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        server.stop()
