"""The in-memory bus keeps NATS subject semantics, so unit tests of wiring mean something."""

from __future__ import annotations

import pytest

from sllm.bus import Entry, MemoryBus, MemoryKeyValue, Message, subject_matches
from sllm.errors import StaleRevision


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("sllm.node.*.cmd", "sllm.node.n1.cmd", True),
        ("sllm.node.*.cmd", "sllm.node.n1.heartbeat", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


async def test_publish_subscribe_and_request() -> None:
    bus = MemoryBus()
    seen: list[str] = []

    async def handler(msg: Message) -> bytes | None:
        seen.append(msg.subject)
        return b"pong" if msg.reply_to else None

    sub = await bus.subscribe("x.*", handler)
    await bus.publish("x.a", b"1")
    assert await bus.request("x.b", b"ping", 1.0) == b"pong"
    await sub.unsubscribe()
    await bus.publish("x.c", b"2")
    assert seen == ["x.a", "x.b"]
    with pytest.raises(TimeoutError):
        await bus.request("x.d", b"ping", 0.1)


async def test_memory_key_value() -> None:
    kv = MemoryKeyValue()
    await kv.put("b", b"2")
    await kv.put("a", b"1")
    assert await kv.keys() == ["a", "b"]
    assert await kv.get("a") == b"1"
    await kv.delete("a")
    assert await kv.get("a") is None


async def test_memory_key_value_revisions() -> None:
    kv = MemoryKeyValue()
    first = await kv.create("lease", b"a")
    with pytest.raises(StaleRevision):
        await kv.create("lease", b"b")
    with pytest.raises(StaleRevision):
        await kv.update("lease", b"b", first + 1)
    second = await kv.update("lease", b"b", first)
    assert second > first
    assert await kv.entry("lease") == Entry(b"b", second)
    with pytest.raises(StaleRevision):
        await kv.update("missing", b"x", 1)
