"""The agent's command handling and heartbeats over the in-memory bus (no processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from runtime.node.agent import NodeAgent
from runtime.node.devices import Device
from sllm.bus import MemoryBus, Message
from sllm.clock import ManualClock
from sllm.messages import (
    CmdReply,
    DrainCmd,
    LoadCmd,
    MigrateCmd,
    NodeHeartbeat,
    UnloadCmd,
    decode_as,
    encode,
    heartbeat_subject,
    node_cmd_subject,
)
from sllm.settings import NodeSettings


class FakeCache:
    def fetch(self, key: str) -> Any:
        raise AssertionError("no load reaches the cache in these tests")

    def release(self, key: str) -> None:
        pass

    def contents(self) -> dict[str, list[tuple[str, int, bool]]]:
        return {"dram": [("checkpoints/a/1", 10, False)], "ssd": []}


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[NodeAgent, MemoryBus]]:
    settings = NodeSettings.from_env(
        {
            "SLLM_NODE_ID": "n1",
            "SLLM_POOL_SIZE": "0",
            "SLLM_VLLM": "off",
            "SLLM_CACHE_DIR": str(tmp_path),
        }
    )
    bus = MemoryBus()
    devices = [Device("cpu:0", "cpu", 1 << 30)]
    node = NodeAgent(settings, bus, FakeCache(), devices, ManualClock())
    await node.start()
    yield node, bus
    await node.stop(drain_s=0.1)


async def ask(bus: MemoryBus, payload: bytes) -> CmdReply:
    return decode_as(await bus.request(node_cmd_subject("n1"), payload, 5.0), CmdReply)


async def test_malformed_payloads_get_protocol_errors(agent: tuple[NodeAgent, MemoryBus]) -> None:
    _, bus = agent
    for payload, needle in [
        (b"\xc1", "malformed"),
        (msgpack.packb({"v": 2, "type": "load", "body": {}}), "version"),
        (msgpack.packb({"v": 1, "type": "nope", "body": {}}), "unknown message type"),
        (msgpack.packb({"v": 1, "type": "unload", "body": {"drain_s": 1.0}}), "instance_id"),
    ]:
        reply = await ask(bus, payload)
        assert not reply.ok and reply.code == "protocol_error" and needle in reply.message


async def test_invalid_record_and_unknown_device_are_refused(
    agent: tuple[NodeAgent, MemoryBus],
) -> None:
    _, bus = agent
    reply = await ask(bus, encode(LoadCmd("i1", "f", {"spec": {"name": "f"}}, "")))
    assert not reply.ok and "record" in reply.message
    record = {
        "spec": {"name": "f", "model": "m"},
        "checkpoint": "checkpoints/f/1",
        "checkpoint_bytes": 1,
    }
    reply = await ask(bus, encode(LoadCmd("i1", "f", record, "cuda:0")))
    assert not reply.ok and reply.code == "not_found" and "cuda:0" in reply.message
    reply = await ask(bus, encode(LoadCmd("i1", "other", record, "")))
    assert not reply.ok and "does not match" in reply.message


async def test_unload_of_an_unknown_instance_is_idempotent(
    agent: tuple[NodeAgent, MemoryBus],
) -> None:
    _, bus = agent
    reply = await ask(bus, encode(UnloadCmd("ghost")))
    assert reply.ok and reply.data == {"state": "absent"}


async def test_drain_refuses_later_loads_and_migrate_of_unknown_instance(
    agent: tuple[NodeAgent, MemoryBus],
) -> None:
    node, bus = agent
    # a migration is answered from a task (the reply published to the inbox when it is done)
    migrate = encode(MigrateCmd("i", "m", "n2", "j", "http://x"))
    assert await node.handle(Message(node_cmd_subject("n1"), migrate, "inbox.7")) is None
    for _ in range(100):
        replies = [m for m in bus.published if m.subject == "inbox.7"]
        if replies:
            break
        await asyncio.sleep(0.01)
    reply = decode_as(replies[0].data, CmdReply)
    assert not reply.ok and reply.code == "not_found" and "instance i " in reply.message
    assert (await ask(bus, encode(DrainCmd(0.1)))).ok
    reply = await ask(bus, encode(LoadCmd("i2", "f", {}, "")))
    assert not reply.ok and reply.code == "unavailable"


async def test_heartbeat_reports_devices_cache_and_capacity(
    agent: tuple[NodeAgent, MemoryBus],
) -> None:
    node, bus = agent
    await node.publish_heartbeat()
    beats = [
        decode_as(m.data, NodeHeartbeat)
        for m in bus.published
        if m.subject == heartbeat_subject("n1")
    ]
    beat = beats[-1]
    assert beat.node_id == "n1" and beat.seq >= 1
    assert [(d.device, d.instance_id) for d in beat.devices] == [("cpu:0", None)]
    assert beat.cache["dram"][0].checkpoint == "checkpoints/a/1"
    assert beat.cache_capacity["dram"] == node.settings.dram_capacity
    assert beat.load_queue_s == 0.0
