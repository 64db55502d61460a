"""What a node publishes counts only under its own subjects: a heartbeat, event or log line
naming another node is dropped (NATS permissions keep each node to ``sllm.node.<id>.``;
tests/integration/bus checks that side). And the instances' secrets never leave the gateway
through the admin API."""

from __future__ import annotations

from sllm.messages import (
    InstanceEvent,
    LogLine,
    NodeHeartbeat,
    encode,
    event_subject,
    heartbeat_subject,
    log_subject,
)
from tests.unit.gateway.conftest import AUTH, Harness, secret_of


async def test_a_node_cannot_speak_for_another(h: Harness) -> None:
    forged = NodeHeartbeat("node-b", 1, [], [], {}, {})
    await h.bus.publish(heartbeat_subject("node-a"), encode(forged))
    nodes = (await h.client.get("/system/nodes", headers=AUTH)).json()
    assert [n["node_id"] for n in nodes] == ["node-a"]

    await h.deploy("chat")
    event = InstanceEvent("ready", "evil-1", "node-b", "chat", "http://127.0.0.1:9", secret="x")
    await h.bus.publish(event_subject("node-a"), encode(event))
    assert "evil-1" not in h.gateway.table.instances

    await h.bus.publish(log_subject("node-a", "chat"), encode(LogLine("chat", "i", "node-b", "x")))
    assert (await h.client.get("/system/logs/chat", headers=AUTH)).json() == []


async def test_instance_secrets_stay_in_the_gateway(h: Harness) -> None:
    await h.deploy("chat")
    r = await h.client.post("/function/chat", json={"messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200
    (inst,) = h.gateway.table.of("chat")
    secret = secret_of(inst.instance_id)
    assert inst.secret == secret and secret not in repr(inst)
    await h.node.heartbeat()
    for path in ("/system/nodes", "/system/functions/chat", "/system/functions", "/metrics"):
        body = (await h.client.get(path, headers=AUTH)).text
        assert secret not in body, path
