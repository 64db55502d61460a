"""An engine over the tiny model for the instance-side migration tests (one per module), and
a gateway-side two-node stage for the Migrator tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.dispatcher import Dispatcher
from gateway.instances import InstanceTable
from gateway.migration.orchestrator import Migrator
from gateway.registry import Registry
from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from sllm.bus import MemoryBus, MemoryKeyValue, Message
from sllm.clock import SystemClock
from sllm.messages import (
    CmdReply,
    DeviceState,
    InstanceState,
    MigrateCmd,
    NodeHeartbeat,
    UnloadCmd,
    decode,
    encode,
    node_cmd_subject,
)
from sllm.spec import FunctionRecord, FunctionSpec


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersBackend]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    engine = TransformersBackend(model, tok.decode, eos_ids=[tokenizer.eos_token_id], max_batch=8)
    engine.start()
    yield engine
    engine.stop()


@dataclass
class TwoNodes:
    """Gateway-side stage of a migration: instance a-1 (the source) on n1 and a ready a-2 (the
    target) on n2, with the heartbeats showing them. n1 answers MigrateCmd with one moved
    request and drops a-1 from the table shortly after an UnloadCmd, as its next heartbeat
    would; ``sent`` records every command either node got."""

    table: InstanceTable
    registry: Registry
    kv: MemoryKeyValue
    bus: MemoryBus
    clock: SystemClock
    sent: list[object]

    def migrator(self, **kwargs: Any) -> Migrator:
        dispatcher = Dispatcher(self.table, self.clock, 10, 10.0, on_wait=lambda fn: None)
        return Migrator(self.table, self.registry, dispatcher, self.bus, self.clock, **kwargs)


async def two_nodes(
    checkpoint: str = "ck/a", gateway_in_flight: int = 0, engine_in_flight: int = 0
) -> TwoNodes:
    """``gateway_in_flight``: a-1's requests through the gateway; ``engine_in_flight``: in its
    engine, as n1's heartbeat reports them."""
    clock, kv, bus = SystemClock(), MemoryKeyValue(), MemoryBus()
    registry = Registry(kv)
    await registry.create(FunctionRecord(FunctionSpec(name="a", model="m"), checkpoint, 10))
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
    return TwoNodes(table, registry, kv, bus, clock, sent)
