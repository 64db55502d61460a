"""Two gateways in one process on one bus and the same buckets (registry, lease, scale state),
with the scripted node: only the one holding the lease loads; a request waiting at the other
wakes the function (its queue reaches the leader); a manual scale sent to the other is applied
by the leader; when the leader stops, the other resumes its scale state and the loads it had
sent, and starts none of them again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette

from gateway.app import Connection, create_app
from gateway.scale_state import ScaleState
from gateway.service import GatewayService
from sllm.bus import MemoryBus, MemoryKeyValue
from sllm.clock import ManualClock
from tests.unit.gateway.conftest import AUTH, BACKEND, ScriptedInstances, ScriptedNode, settings
from tests.unit.gateway.test_invoke import wait_for


@dataclass
class Gw:
    app: Starlette
    client: httpx.AsyncClient
    stack: AsyncExitStack

    @property
    def service(self) -> GatewayService:
        gateway: GatewayService = self.app.state.gateway
        return gateway

    async def stop(self) -> None:
        await self.stack.aclose()


@dataclass
class Pair:
    a: Gw
    b: Gw
    node: ScriptedNode
    shared: Connection


@asynccontextmanager
async def pair(tick_s: float = 0.02, **scale: Any) -> AsyncIterator[Pair]:
    bus = MemoryBus()
    shared = Connection(bus, MemoryKeyValue(), MemoryKeyValue(), MemoryKeyValue())
    BACKEND.instances = ScriptedInstances()
    node = ScriptedNode(bus, BACKEND.start())

    async def connect(_: object) -> Connection:
        return shared

    async def gateway(name: str) -> Gw:
        stack = AsyncExitStack()
        app = create_app(settings(gateway_id=name), connect=connect, tick_s=tick_s, settle_s=0)
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url=f"http://{name}")
        await stack.enter_async_context(client)
        return Gw(app, client, stack)

    a = await gateway("gw-a")  # started first: it takes the lease
    b = await gateway("gw-b")
    try:
        await node.start()
        spec = {"name": "chat", "model": "tiny", "handler": "chat", "auth": "public",
                "scale": {"min": 0, "max": 3, "target_concurrency": 4, "keep_alive": "60s",
                          **scale}}  # fmt: skip
        body = {"spec": spec, "checkpoint": "checkpoints/chat/abc", "checkpoint_bytes": 1000}
        r = await a.client.post("/system/functions", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        await wait_for(lambda: b.service.registry.find("chat") is not None)
        yield Pair(a, b, node, shared)
    finally:
        await b.stop()
        await a.stop()


async def test_only_the_leader_loads_and_a_request_at_the_other_wakes_the_function() -> None:
    async with pair() as p:
        assert p.a.service.peers.deciding() and not p.b.service.peers.deciding()
        r = await p.b.client.post("/function/chat", json={"prompt": "hello"})
        assert r.status_code == 200, r.text
        assert len(p.node.loads) == 1  # one wake, by the leader, for a request at the other
        health = (await p.b.client.get("/healthz")).json()
        assert health["leader"] == "gw-a" and not health["deciding"]


async def test_a_request_waiting_at_the_other_gateway_wakes_the_leader_at_once() -> None:
    # The leader's loop runs every tick_s, and at once when a request waits *there*; one that
    # waits at another gateway reached it only by the report, which it read at its next tick
    # (up to 0.5 s later by default; here a tick is 60 s, so only the report can wake it).
    async with pair(tick_s=60.0) as p:
        started = asyncio.get_running_loop().time()
        r = await p.b.client.post("/function/chat", json={"prompt": "hello"})
        assert r.status_code == 200, r.text
        assert asyncio.get_running_loop().time() - started < 5.0
        assert len(p.node.loads) == 1


async def test_a_manual_scale_at_the_other_gateway_is_applied_by_the_leader() -> None:
    async with pair() as p:
        r = await p.b.client.post("/system/scale/chat", json={"replicas": 2}, headers=AUTH)
        assert r.status_code == 202, r.text
        await wait_for(lambda: len(p.node.loads) == 2)
        assert p.a.service.controller.replicas("chat")["desired"] == 2


async def test_the_next_leader_resumes_the_scale_state_and_starts_nothing_twice() -> None:
    async with pair() as p:
        p.node.load_s = 3600.0  # loads are taken and never finish: no event, no heartbeat
        p.node.slots = 3
        await p.node.heartbeat()
        await wait_for(lambda: len(p.a.service.table.nodes["node-a"].heartbeat.devices) == 3)
        r = await p.b.client.post("/system/scale/chat", json={"replicas": 3}, headers=AUTH)
        assert r.status_code == 202
        await wait_for(lambda: len(p.node.loads) == 3)
        # what the leader decided and sent is in the scale bucket before the loads go out
        assert p.shared.scale is not None
        kept = await ScaleState(p.shared.scale, ManualClock()).load()
        assert kept.desired == {"chat": 3} and len(kept.starting) == 3
        await wait_for(lambda: p.b.service.peers.leadership.holder == "gw-a")
        await p.a.stop()  # a clean stop hands the lease over at once
        await wait_for(lambda: p.b.service.peers.deciding(), timeout_s=5.0)
        starting = {i.instance_id for i in p.b.service.table.instances.values()}
        assert starting == {cmd.instance_id for cmd in p.node.loads}
        assert p.b.service.controller.replicas("chat") == {"ready": 0, "starting": 3, "desired": 3}
        await asyncio.sleep(0.3)  # many control-loop rounds at 0.02 s
        assert len(p.node.loads) == 3  # none started twice
