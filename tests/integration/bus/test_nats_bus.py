"""The NATS adapter against the real server: request-reply, wildcards, KV persistence."""

from __future__ import annotations

import pytest

from sllm.bus import Message
from sllm.errors import Unavailable
from sllm.nats_bus import NatsBus


async def test_request_reply_and_publish(nats_url: str) -> None:
    bus = await NatsBus.connect(nats_url, "test")
    received: list[bytes] = []

    async def handler(msg: Message) -> bytes | None:
        received.append(msg.data)
        return b"ack:" + msg.data if msg.reply_to else None

    await bus.subscribe("t.*.cmd", handler)
    assert await bus.request("t.n1.cmd", b"load", 2.0) == b"ack:load"
    with pytest.raises(TimeoutError, match=r"no reply on nobody\.home"):
        await bus.request("nobody.home", b"x", 0.3)
    await bus.close()
    assert received == [b"load"]


async def test_key_value_survives_reconnect(nats_url: str) -> None:
    bus = await NatsBus.connect(nats_url, "kv-writer")
    kv = await bus.key_value("test_registry")
    await kv.put("fn.chat", b"v1")
    await bus.close()

    bus2 = await NatsBus.connect(nats_url, "kv-reader")
    kv2 = await bus2.key_value("test_registry")
    assert await kv2.get("fn.chat") == b"v1"
    assert "fn.chat" in await kv2.keys()
    await kv2.delete("fn.chat")
    assert await kv2.get("fn.chat") is None
    await bus2.close()


async def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await NatsBus.connect("nats://127.0.0.1:1", "x", connect_timeout_s=0.5)
