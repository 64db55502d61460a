"""Instances a node does not report. A node that restarts (its heartbeat's seq starts again)
no longer knows the instances of the process before it: they drain on their own and are
dropped at its first beat, not after the launch grace; a load still starting there keeps its
grace. A load no node ever reported is dropped after the grace and replaced."""

from __future__ import annotations

from gateway.instances import LAUNCH_GRACE_S, InstanceTable
from sllm.messages import InstanceEvent, InstanceState, NodeHeartbeat


def beat(seq: int, *ids: str) -> NodeHeartbeat:
    states = [InstanceState(i, "chat", "cpu:0", "ready", f"http://h:{n}", 0)
              for n, i in enumerate(ids)]  # fmt: skip
    return NodeHeartbeat("n1", seq, [], states, {}, {})


def table_with_ready(*ids: str) -> InstanceTable:
    table = InstanceTable()
    for n, i in enumerate(ids):
        table.launched(i, "chat", "n1", "cpu:0", 1, now=0.0)
        table.on_event(InstanceEvent("ready", i, "n1", "chat", address=f"http://h:{n}"), now=1.0)
    table.on_heartbeat(beat(40, *ids), now=2.0)
    return table


def test_the_first_beat_after_a_restart_drops_the_old_processes_instances() -> None:
    table = table_with_ready("old-1", "old-2")
    table.launched("new-1", "chat", "n1", "cpu:1", 1, now=2.5)  # sent to the new process
    change = table.on_heartbeat(beat(1), now=3.0)  # well inside the launch grace
    assert sorted(i.instance_id for i in change.removed) == ["old-1", "old-2"]
    assert [i.instance_id for i in table.of("chat")] == ["new-1"]
    assert table.routable("chat") == []


def test_a_beat_of_the_same_process_keeps_the_grace() -> None:
    table = table_with_ready("i-1")
    # a beat sent before the ready event arrived: the instance is missing from it
    change = table.on_heartbeat(beat(41), now=3.0)
    assert change.removed == [] and [i.instance_id for i in table.routable("chat")] == ["i-1"]
    change = table.on_heartbeat(beat(42), now=1.0 + LAUNCH_GRACE_S + 0.1)
    assert [i.instance_id for i in change.removed] == ["i-1"]


async def test_a_resumed_load_that_never_started_is_replaced() -> None:
    """The leader before booked two loads and died before sending them. The gateway that
    resumes counts them as starting until the launch grace drops them, and then starts two
    others: the scale that wanted them still stands (tests/integration/ha's leader kill ran
    1 instance of 3 for 2 minutes when the kill came between the booking and the send)."""
    from gateway.scale_state import Resumed
    from sllm.peer_messages import StartRecord
    from tests.unit.gateway.conftest import AUTH, harness
    from tests.unit.gateway.test_invoke import wait_for

    async with harness(stable_window_s=3600.0) as h:
        h.node.slots = 3
        await h.node.heartbeat()
        await h.deploy(max=3)
        lost = [StartRecord(f"chat-lost{i}", "chat", "node-a", f"cpu{i}", 1, 1) for i in (0, 1)]
        h.gateway.controller.resume(Resumed({"chat": 2}, lost))
        r = await h.client.post("/system/scale/chat", json={"replicas": 3}, headers=AUTH)
        assert r.status_code == 202, r.text
        await wait_for(lambda: len(h.gateway.table.routable("chat")) == 1)  # the third
        for record in lost:  # their launch grace is over
            h.gateway.table.instances[record.instance_id].since -= LAUNCH_GRACE_S + 1.0
        await h.node.heartbeat()  # reports neither lost load: both are dropped
        await wait_for(lambda: len(h.gateway.table.routable("chat")) == 3)
        assert len(h.node.loads) == 3 and "chat-lost0" not in h.gateway.table.instances
