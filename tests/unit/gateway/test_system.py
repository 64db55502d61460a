"""The admin API: auth, deploy/update/describe/delete, scale, nodes, logs, info; the registry
survives a gateway restart."""

from __future__ import annotations

import asyncio

import httpx

from gateway.app import Connection, create_app
from sllm.bus import MemoryKeyValue, Message
from sllm.messages import (
    LogLine,
    PrepareCmd,
    ScaleRecord,
    decode,
    encode,
    log_subject,
    node_cmd_subject,
)
from sllm.spec import FunctionRecord
from tests.unit.gateway.conftest import AUTH, Harness, harness, settings


async def test_system_needs_the_bearer_token(h: Harness) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        r = await h.client.get("/system/functions", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
    assert (await h.client.get("/system/functions", headers=AUTH)).status_code == 200


async def test_deploy_list_describe_update_delete(h: Harness) -> None:
    r = await h.deploy()
    assert r.status_code == 201
    created = r.json()
    assert created["name"] == "chat" and created["revision"] == 1
    assert created["spec"]["scale"]["keep_alive_s"] == 60.0
    assert created["replicas"] == {"ready": 0, "starting": 0, "desired": 0}
    assert (await h.deploy()).status_code == 409

    listed = (await h.client.get("/system/functions", headers=AUTH)).json()
    assert [f["name"] for f in listed] == ["chat"]

    await h.client.post("/function/chat", json={"prompt": "x"})
    described = (await h.client.get("/system/functions/chat", headers=AUTH)).json()
    assert described["replicas"]["ready"] == 1
    (inst,) = described["instances"]
    assert inst["node"] == "node-a" and inst["state"] == "ready" and inst["in_flight"] == 0

    # Update in place with the internal spec form: revision 2, old instance replaced.
    body = {"spec": created["spec"] | {"env": {"A": "1"}}, "checkpoint": "checkpoints/chat/def",
            "checkpoint_bytes": 2000}  # fmt: skip
    r = await h.client.put("/system/functions/chat", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["revision"] == 2
    r = await h.client.post("/function/chat", json={"prompt": "y"})
    assert r.status_code == 200  # served by revision 1 until revision 2 is ready
    for _ in range(100):
        if [i.revision for i in h.gateway.table.of("chat")] == [2]:
            break
        await asyncio.sleep(0.02)
    assert [i.revision for i in h.gateway.table.of("chat")] == [2]
    assert h.node.loads[-1].record["checkpoint"] == "checkpoints/chat/def"
    assert h.node.unloads[-1].instance_id == inst["id"]

    r = await h.client.delete("/system/functions/chat", headers=AUTH)
    assert r.status_code == 204
    assert (await h.client.get("/system/functions/chat", headers=AUTH)).status_code == 404
    for _ in range(100):
        if not h.node.instances:
            break
        await asyncio.sleep(0.02)
    assert not h.node.instances, "deleted function's instances were not unloaded"
    metrics = (await h.client.get("/metrics")).text
    assert 'sllm_instances{function="chat"' not in metrics
    assert (await h.client.post("/function/chat", json={"prompt": "x"})).status_code == 404


async def test_manual_scale(h: Harness) -> None:
    await h.deploy()
    r = await h.client.post("/system/scale/chat", json={"replicas": 2}, headers=AUTH)
    assert r.status_code == 202
    for _ in range(100):
        if len(h.gateway.table.routable("chat")) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(h.node.loads) == 2
    for bad in ({"replicas": -1}, {"replicas": 3}, {"replicas": "2"}, {}):
        r = await h.client.post("/system/scale/chat", json=bad, headers=AUTH)
        assert r.status_code == 400 and "replicas" in r.json()["error"]["message"]
    r = await h.client.post("/system/scale/nope", json={"replicas": 1}, headers=AUTH)
    assert r.status_code == 404


async def test_nodes_info_and_logs(h: Harness) -> None:
    await h.deploy()
    nodes = (await h.client.get("/system/nodes", headers=AUTH)).json()
    assert [n["node_id"] for n in nodes] == ["node-a"] and nodes[0]["live"]
    info = (await h.client.get("/system/info", headers=AUTH)).json()
    assert info["nodes"] == 1 and info["store_url"] == "/tmp/store" and info["version"]
    for i in range(5):
        line = LogLine("chat", "chat-1", "node-a", f"line {i}")
        await h.bus.publish(log_subject(line.node_id, "chat"), encode(line))
    logs = (await h.client.get("/system/logs/chat?tail=2", headers=AUTH)).json()
    assert [x["line"] for x in logs] == ["line 3", "line 4"]
    r = await h.client.get("/system/logs/chat?tail=x", headers=AUTH)
    assert r.status_code == 400
    health = (await h.client.get("/healthz")).json()
    me = h.gateway.settings.gateway_id
    assert health == {
        "status": "ok",
        "functions": 1,
        "nodes": 1,
        "gateway": me,
        "deciding": True,
        "leader": me,
    }


async def test_a_restart_keeps_the_registry() -> None:
    async with harness() as h:
        await h.deploy()
        kv, bus = h.kv, h.bus

    async def connect(_):  # type: ignore[no-untyped-def]
        return Connection(bus, kv)

    app = create_app(settings(), connect=connect)
    async with app.router.lifespan_context(app):
        records = app.state.gateway.registry.all()
        assert [r.spec.name for r in records] == ["chat"]
        assert records[0].checkpoint == "checkpoints/chat/abc"


async def test_a_restarted_gateway_adopts_running_instances_instead_of_draining_them() -> None:
    async with harness() as h:
        await h.deploy()
        assert (await h.client.post("/function/chat", json={"prompt": "x"})).status_code == 200
        bus, kv, node, instances = h.bus, h.kv, h.node, h.instances
        # A second gateway on the same bucket and bus, after the first one's bus went away; the
        # last leader's scale state says one instance of chat is wanted, which is the one that
        # runs (adopting it must not make it two: it once started a second and drained it)
        lease, scale = MemoryKeyValue(), MemoryKeyValue()
        await scale.put("desired.chat", encode(ScaleRecord(1, 1)))

        async def connect(_):  # type: ignore[no-untyped-def]
            return Connection(bus, kv, lease, scale)

        app = create_app(settings(), connect=connect, tick_s=0.02, settle_s=0.3)
        await bus.close()
        async with app.router.lifespan_context(app):
            await node.start()  # re-subscribes and beats: the new gateway learns what runs
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                r = await client.post("/function/chat", json={"prompt": "again"})
                assert r.status_code == 200
                await asyncio.sleep(0.3)
                assert len(node.loads) == 1 and not node.unloads
                info = (await client.get("/system/functions/chat", headers=AUTH)).json()
                assert info["replicas"] == {"ready": 1, "starting": 0, "desired": 1}
                assert [x[1] for x in instances.seen] == ["/v1/invoke", "/v1/invoke"]


async def test_deploy_and_update_with_requirements_tell_the_nodes(h: Harness) -> None:
    """Nodes that run instances in containers build a function's image at its deploy."""
    announced: list[PrepareCmd] = []

    async def on_command(msg: Message) -> None:
        command = decode(msg.data)
        if isinstance(command, PrepareCmd):
            assert msg.reply_to is None  # published: nothing waits for the build
            announced.append(command)

    # on the node's own command subject, the only one NATS lets a node receive
    await h.bus.subscribe(node_cmd_subject(h.node.node_id), on_command)
    body = {"spec": {"name": "fmt", "model": "m"}, "checkpoint": "k", "checkpoint_bytes": 1}
    assert (await h.client.post("/system/functions", json=body, headers=AUTH)).status_code == 201
    assert announced == []  # nothing to build for a function without requirements
    body["requirements"] = "humanize==4.12.3\n"
    r = await h.client.put("/system/functions/fmt", json=body, headers=AUTH)
    assert r.status_code == 200
    for _ in range(50):
        if announced:
            break
        await asyncio.sleep(0.01)
    (prepare,) = announced
    assert prepare.function == "fmt"
    record = FunctionRecord.from_dict(prepare.record)
    assert (record.requirements, record.revision) == ("humanize==4.12.3\n", 2)
    bad = await h.client.put(
        "/system/functions/fmt", json=body | {"requirements": ["humanize"]}, headers=AUTH
    )
    assert bad.status_code == 422 and "requirements" in bad.json()["error"]["message"]
