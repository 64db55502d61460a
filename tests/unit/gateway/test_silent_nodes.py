"""Heartbeat silence is no proof of death (issue 14): a node that stops beating is not offered
to placements any more, but its instances keep serving while they answer their health check;
those that do not are dropped, and the node with them once none answers."""

from __future__ import annotations

from tests.unit.gateway.conftest import harness
from tests.unit.gateway.test_invoke import wait_for


async def test_a_silent_nodes_instances_serve_while_they_answer() -> None:
    async with harness(node_timeout_s=0.3, wake_timeout_s=1.0) as h:
        await h.deploy()
        r = await h.client.post("/function/chat", json={"prompt": "a"})
        assert r.status_code == 200
        (inst,) = h.gateway.table.routable("chat")
        # the scripted node beat once: it is silent from now on, its instance still serves
        await wait_for(lambda: h.gateway.table.silent_nodes(h.gateway.clock.now()) != [])
        await wait_for(lambda: "node-a" in h.gateway.controller.silent.probing)
        for prompt in ("b", "c"):
            r = await h.client.post("/function/chat", json={"prompt": prompt})
            assert r.status_code == 200 and r.json()["text"] == f"echo: {prompt}"
        assert h.gateway.table.live_nodes(h.gateway.clock.now()) == []  # no new placements
        # the instance stops answering its health check: it is dropped, and the node with it
        h.instances.not_serving.add(inst.instance_id)
        await wait_for(lambda: "node-a" not in h.gateway.table.nodes, timeout_s=3.0)
        assert h.gateway.table.of("chat") == []
        r = await h.client.post("/function/chat", json={"prompt": "d"})
        assert r.status_code == 503
        assert "no node is connected" in r.json()["error"]["message"]
