"""The backend an instance runs, as the gateway learns it (ready event, heartbeats) and shows it
(``/system/functions/<name>``, ``sllm fn describe``)."""

from __future__ import annotations

from gateway.instances import InstanceTable
from sllm.messages import InstanceEvent, InstanceState, NodeHeartbeat

REASON = (
    "auto fell back to transformers: vLLM 0.32.0's CPU attention has no kernel for head size 16"
)


def test_ready_event_and_heartbeat_carry_the_backend_and_why() -> None:
    table = InstanceTable()
    table.launched("i-1", "chat", "n1", "cpu:0", 1, now=0.0)
    ready = InstanceEvent("ready", "i-1", "n1", "chat", address="http://x:1",
                          backend="transformers", backend_reason=REASON)  # fmt: skip
    table.on_event(ready, now=1.0)
    summary = table.of("chat")[0].summary()
    assert summary["backend"] == "transformers" and summary["backend_reason"] == REASON
    # a restarted gateway adopts the instance from a heartbeat, backend included
    fresh = InstanceTable()
    state = InstanceState("i-1", "chat", "cpu:0", "ready", "http://x:1", 0, backend="vllm",
                          backend_reason="auto: vLLM 0.32.0 supports the model")  # fmt: skip
    fresh.on_heartbeat(NodeHeartbeat("n1", 1, [], [state], {}, {}), now=2.0)
    assert fresh.of("chat")[0].summary()["backend"] == "vllm"
