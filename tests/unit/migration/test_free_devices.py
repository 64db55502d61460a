"""Migrator.free_devices, which applies a scheduler's migration decision: a busy victim is
migrated (MigrateCmd), a victim that went idle since the decision is only stopped (UnloadCmd,
no target loaded), and one already gone frees its devices with no command at all."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dispatcher import Dispatcher
from gateway.instances import InstanceTable
from gateway.migration.orchestrator import Migrator
from gateway.registry import Registry
from gateway.scheduler.types import Migration
from sllm.bus import MemoryBus, MemoryKeyValue, Message
from sllm.clock import SystemClock
from sllm.messages import (
    CmdReply,
    DeviceState,
    InstanceState,
    LoadCmd,
    MigrateCmd,
    NodeHeartbeat,
    UnloadCmd,
    decode,
    encode,
    node_cmd_subject,
)
from sllm.spec import FunctionRecord, FunctionSpec

MOVE = Migration("a-1", "a", "n1", ("cpu:0",), "n2", ("cpu:0",), "dram", 1.0)


async def stage(
    gateway_in_flight: int, engine_in_flight: int
) -> tuple[Migrator, InstanceTable, list[object]]:
    """Victim a-1 on n1 (ready), a ready a-2 on n2 (the target); n1 answers MigrateCmd and
    drops a-1 from the table on UnloadCmd, as its next heartbeat would."""
    clock, bus = SystemClock(), MemoryBus()
    registry = Registry(MemoryKeyValue())
    await registry.create(FunctionRecord(FunctionSpec(name="a", model="m"), "ck/a", 10))
    table = InstanceTable()
    for instance_id, node in (("a-1", "n1"), ("a-2", "n2")):
        inst = table.launched(instance_id, "a", node, "cpu:0", 1, 0.0)
        inst.state, inst.address = "ready", f"http://{node}"
    table.instances["a-1"].in_flight = gateway_in_flight
    for node, instance_id, busy in (("n1", "a-1", engine_in_flight), ("n2", "a-2", 0)):
        table.on_heartbeat(
            NodeHeartbeat(
                node, 1, [DeviceState("cpu:0", "cpu", 0, instance_id)],
                [InstanceState(instance_id, "a", "cpu:0", "ready", f"http://{node}", busy)],
                {}, {},
            ),
            clock.now(),
        )  # fmt: skip
    sent: list[object] = []

    async def node_1(msg: Message) -> bytes:
        command = decode(msg.data)
        sent.append(command)
        if isinstance(command, MigrateCmd):
            return encode(CmdReply(ok=True, data={"moved": 1, "tokens": 400, "seconds": 0.7}))
        if isinstance(command, UnloadCmd):
            asyncio.get_running_loop().call_later(0.05, table.forget, "a-1")
        return encode(CmdReply(ok=True))

    async def node_2(msg: Message) -> bytes:
        sent.append(decode(msg.data))
        return encode(CmdReply(ok=True))

    await bus.subscribe(node_cmd_subject("n1"), node_1)
    await bus.subscribe(node_cmd_subject("n2"), node_2)
    dispatcher = Dispatcher(table, clock, 10, 10.0, on_wait=lambda fn: None)
    return Migrator(table, registry, dispatcher, bus, clock), table, sent


@pytest.mark.parametrize(("gateway_in_flight", "engine_in_flight"), [(1, 1), (0, 2), (1, 0)])
async def test_busy_victim_is_migrated(gateway_in_flight: int, engine_in_flight: int) -> None:
    # busy through this gateway, or only in its engine (streams moved onto it earlier)
    migrator, table, sent = await stage(gateway_in_flight, engine_in_flight)
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert [type(c) for c in sent] == [MigrateCmd, UnloadCmd]
    assert "a-1" not in table.instances


async def test_victim_idle_since_the_decision_is_stopped_not_moved() -> None:
    migrator, table, sent = await stage(0, 0)
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert [type(c) for c in sent] == [UnloadCmd]  # no MigrateCmd, no LoadCmd for a target
    assert "a-1" not in table.instances and migrator.models.fits() == {}


async def test_victim_already_gone_needs_no_command() -> None:
    migrator, table, sent = await stage(1, 1)
    table.forget("a-1")
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert sent == [] and not any(isinstance(c, LoadCmd) for c in sent)
