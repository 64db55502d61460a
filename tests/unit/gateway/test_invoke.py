"""Invocation through the in-process gateway: scale from zero, the cold-start queue, routing and
retries, streaming passthrough."""

from __future__ import annotations

import asyncio
import json

from sllm_cli.servers import free_port
from tests.unit.gateway.conftest import AUTH, Harness, ScriptedNode, harness


async def wait_for(predicate, timeout_s: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_cold_request_starts_one_instance_and_gets_the_answer(h: Harness) -> None:
    assert (await h.deploy()).status_code == 201
    r = await h.client.post("/function/chat", json={"prompt": "hello"})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "echo: hello"
    assert len(h.node.loads) == 1
    load = h.node.loads[0]
    assert load.function == "chat" and load.record["checkpoint"] == "checkpoints/chat/abc"
    metrics = (await h.client.get("/metrics")).text
    assert metric(metrics, 'sllm_cold_starts_total{function="chat",tier="dram"}') == 1
    assert metric(metrics, 'sllm_wakes_total{function="chat"}') == 1
    assert metric(metrics, 'sllm_requests_total{api="function",function="chat",status="200"}') == 1


async def test_twenty_concurrent_cold_requests_cause_exactly_one_wake(h: Harness) -> None:
    await h.deploy(target_concurrency=32)
    h.node.load_s = 0.2
    replies = await asyncio.gather(
        *(h.client.post("/function/chat", json={"prompt": f"p{i}"}) for i in range(20))
    )
    assert [r.status_code for r in replies] == [200] * 20
    assert [r.json()["text"] for r in replies] == [f"echo: p{i}" for i in range(20)]
    assert len(h.node.loads) == 1
    metrics = (await h.client.get("/metrics")).text
    assert metric(metrics, 'sllm_wakes_total{function="chat"}') == 1


async def test_a_full_cold_start_queue_answers_429_with_retry_after() -> None:
    async with harness(queue_size=2) as h:
        await h.deploy()
        h.node.load_s = 0.3
        replies = await asyncio.gather(
            *(h.client.post("/function/chat", json={"prompt": "x"}) for _ in range(3))
        )
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200, 429]
        full = next(r for r in replies if r.status_code == 429)
        assert full.json()["error"]["code"] == "overloaded"
        assert int(full.headers["retry-after"]) >= 1


async def test_a_failed_wake_answers_503_with_the_reason(h: Harness) -> None:
    await h.deploy()
    h.node.fail_ready = "handler module failed to import: No module named 'nope'"
    r = await h.client.post("/function/chat", json={"prompt": "x"})
    assert r.status_code == 503
    assert "No module named 'nope'" in r.json()["error"]["message"]


async def test_a_refused_load_is_retried_and_the_request_waits_for_it() -> None:
    # issue 14: a refusal for a passing reason (busy, no reply, node gone) no longer fails the
    # queued requests in milliseconds; they wait while the controller tries again
    async with harness(wake_timeout_s=5.0) as h:
        await h.deploy()
        h.node.refuse = True
        pending = asyncio.create_task(h.client.post("/function/chat", json={"prompt": "x"}))
        await wait_for(lambda: len(h.node.loads) >= 3)
        assert not pending.done()
        h.node.refuse = False
        r = await pending
        assert r.status_code == 200 and r.json()["text"] == "echo: x"


async def test_a_refusal_lasting_past_the_wake_deadline_answers_503_naming_it() -> None:
    async with harness(wake_timeout_s=0.5) as h:
        await h.deploy()
        h.node.refuse = True
        r = await h.client.post("/function/chat", json={"prompt": "x"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "wake deadline" in message and "refused by script" in message


async def test_a_definitive_refusal_answers_503_at_once(h: Harness) -> None:
    await h.deploy()
    h.node.refuse, h.node.refuse_code = True, "validation_failed"
    r = await h.client.post("/function/chat", json={"prompt": "x"})
    assert r.status_code == 503
    assert "refused by script" in r.json()["error"]["message"]
    assert "wake deadline" not in r.json()["error"]["message"]


async def test_the_wake_deadline_is_separate_from_the_request_timeout() -> None:
    async with harness(wake_timeout_s=0.3) as h:
        await h.deploy()
        h.node.load_s = 2.0
        r = await h.client.post("/function/chat", json={"prompt": "x"})
        assert r.status_code == 503
        assert "wake deadline" in r.json()["error"]["message"]


async def test_with_no_node_a_request_waits_to_the_deadline_and_says_why() -> None:
    async with harness(wake_timeout_s=0.5) as h:
        h.gateway.table.nodes.clear()
        await h.bus.close()  # the scripted node stops beating and answering
        await h.deploy()
        r = await h.client.post("/function/chat", json={"prompt": "x"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "wake deadline" in message and "no node is connected" in message


async def test_a_request_that_failed_before_any_byte_is_retried_elsewhere(h: Harness) -> None:
    await h.deploy()
    assert (await h.client.post("/system/scale/chat", json={"replicas": 2},
                                headers={"authorization": "Bearer test-token"})).status_code == 202  # fmt: skip
    await wait_for(lambda: len(h.gateway.table.routable("chat")) == 2)
    dead = h.gateway.table.routable("chat")[0]
    dead.address = f"http://127.0.0.1:{free_port()}"  # the instance died: nothing listens
    for _ in range(3):
        r = await h.client.post("/function/chat", json={"prompt": "x"})
        assert r.status_code == 200, r.text
    assert all(iid != dead.instance_id for iid, _, _ in h.instances.seen)
    assert dead.state == "unreachable" and dead.in_flight == 0
    metrics = (await h.client.get("/metrics")).text
    assert metric(metrics, 'sllm_request_retries_total{function="chat"}') >= 1


async def test_a_stream_passes_through_as_events(h: Harness) -> None:
    await h.deploy()
    r = await h.client.post("/function/chat", json={"prompt": "a b c", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["delta"] for e in events[:-2]]
    assert "".join(deltas) == "echo: a b c "


async def test_a_stream_that_breaks_ends_with_an_error_event(h: Harness) -> None:
    await h.deploy()
    await h.client.post("/function/chat", json={"prompt": "warm"})
    (inst,) = h.gateway.table.routable("chat")
    h.instances.break_stream.add(inst.instance_id)
    r = await h.client.post("/function/chat", json={"prompt": "a b c", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0]["delta"] == "echo: "
    assert events[-1]["error"]["code"] == "instance_failed"
    assert inst.in_flight == 0


async def test_a_stopping_gateway_ends_streams_with_an_error_event_after_its_grace(
    h: Harness,
) -> None:
    await h.deploy()
    await h.client.post("/function/chat", json={"prompt": "warm"})
    h.gateway.begin_stop(0.0)  # what SIGTERM does (sllm_cli.gateway), with no grace
    await wait_for(h.gateway.proxy.streams_end.is_set)
    # the non-streamed answer is whole; the stream ends at its next chunk, with a clear error
    whole = await h.client.post("/function/chat", json={"prompt": "a b c"})
    assert whole.status_code == 200 and whole.json()["text"] == "echo: a b c"
    r = await h.client.post("/function/chat", json={"prompt": "a b c", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0]["delta"] == "echo: "
    assert events[-1]["error"]["code"] == "gateway_stopping"
    assert "[DONE]" not in r.text
    (inst,) = h.gateway.table.routable("chat")
    assert inst.in_flight == 0


async def test_routing_prefers_the_instance_with_fewest_in_flight(h: Harness) -> None:
    await h.deploy()
    await h.client.post("/system/scale/chat", json={"replicas": 2},
                        headers={"authorization": "Bearer test-token"})  # fmt: skip
    await wait_for(lambda: len(h.gateway.table.routable("chat")) == 2)
    h.instances.delay_s = 0.1
    await asyncio.gather(*(h.client.post("/function/chat", json={"prompt": "x"}) for _ in range(6)))
    hosts = [iid for iid, _, _ in h.instances.seen]
    assert sorted({hosts.count(x) for x in set(hosts)}) == [3]


async def test_scale_to_zero_after_keep_alive_drains_the_instance(h: Harness) -> None:
    await h.deploy(keep_alive="200ms")
    assert (await h.client.post("/function/chat", json={"prompt": "x"})).status_code == 200
    await wait_for(lambda: len(h.node.unloads) == 1)
    await wait_for(lambda: not h.gateway.table.of("chat"))
    # And it wakes again.
    assert (await h.client.post("/function/chat", json={"prompt": "y"})).status_code == 200
    assert len(h.node.loads) == 2


async def test_client_gone_releases_the_in_flight_slot(h: Harness) -> None:
    await h.deploy()
    await h.client.post("/function/chat", json={"prompt": "warm"})
    h.instances.delay_s = 0.5
    task = asyncio.create_task(h.client.post("/function/chat", json={"prompt": "x"}))
    await wait_for(lambda: sum(i.in_flight for i in h.gateway.table.of("chat")) == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_for(lambda: sum(i.in_flight for i in h.gateway.table.of("chat")) == 0)


async def test_custom_handler_body_goes_through_unchanged(h: Harness) -> None:
    spec = {"name": "custom", "model": "tiny", "handler": "handler:handle", "auth": "public"}
    body = {"spec": spec, "checkpoint": "k", "checkpoint_bytes": 1,
            "handler_source": {"handler.py": "def handle(r, ctx): ..."}}  # fmt: skip
    assert (await h.client.post("/system/functions", json=body,
                                headers={"authorization": "Bearer test-token"})).status_code == 201  # fmt: skip
    r = await h.client.post("/function/custom", json={"prompt": "z", "anything": [1, 2]})
    assert r.status_code == 200
    _, path, seen = h.instances.seen[-1]
    assert path == "/v1/invoke" and seen == {"prompt": "z", "anything": [1, 2]}


async def test_an_idle_instance_is_evicted_for_another_function_then_the_load_goes_out() -> None:
    async with harness() as h:
        h.node.slots = 1
        await h.node.heartbeat()
        await h.deploy("a")
        await h.deploy("b")
        assert (await h.client.post("/function/a", json={"prompt": "x"})).status_code == 200
        await h.node.heartbeat()  # the node reports a's instance idle on the only device
        r = await h.client.post("/function/b", json={"prompt": "y"})
        assert r.status_code == 200, r.text
        assert [u.instance_id for u in h.node.unloads] == [h.node.loads[0].instance_id]
        assert [load.function for load in h.node.loads] == ["a", "b"]


async def test_an_instance_at_its_functions_min_is_not_evicted() -> None:
    async with harness(wake_timeout_s=0.5) as h:
        h.node.slots = 1
        await h.node.heartbeat()
        await h.deploy("a", min=1)
        await h.deploy("b")
        await wait_for(lambda: len(h.gateway.table.routable("a")) == 1)
        await h.node.heartbeat()
        r = await h.client.post("/function/b", json={"prompt": "y"})
        assert r.status_code == 503
        assert not h.node.unloads


async def test_a_scale_up_does_not_evict_an_instance_of_the_same_function() -> None:
    # Seen in the HA tests: a full node, a scale-up of a function with an idle instance there:
    # the placement stopped that instance to load another of the same function in its place
    # (a cold start for nothing, and one instance fewer meanwhile).
    async with harness() as h:
        h.node.slots = 1
        await h.node.heartbeat()
        await h.deploy("a", max=2)
        assert (await h.client.post("/function/a", json={"prompt": "x"})).status_code == 200
        await h.node.heartbeat()  # a's instance, idle, on the only device
        r = await h.client.post("/system/scale/a", json={"replicas": 2}, headers=AUTH)
        assert r.status_code == 202, r.text
        for _ in range(20):  # ten control ticks and more: nothing is stopped, nothing loaded
            await h.node.heartbeat()
            await asyncio.sleep(0.02)
        assert not h.node.unloads and len(h.node.loads) == 1
        assert len(h.gateway.table.routable("a")) == 1


async def test_a_load_refused_by_one_node_is_placed_on_another() -> None:
    async with harness() as h:
        other = ScriptedNode(h.bus, h.node.base_url, node_id="node-b")
        await other.start()
        h.node.refuse = True
        other.refuse = True
        await h.deploy()
        # refused everywhere: the request waits (issue 14) while both nodes are tried again
        pending = asyncio.create_task(h.client.post("/function/chat", json={"prompt": "x"}))
        await wait_for(lambda: len(other.loads) >= 2 and len(h.node.loads) >= 2)
        other.refuse = False
        r = await pending
        assert r.status_code == 200, r.text
        (inst,) = h.gateway.table.routable("chat")
        assert inst.node == "node-b"


async def test_scale_down_after_the_stable_window_drains_one_instance(h: Harness) -> None:
    await h.deploy()  # keep_alive 60s; the harness's scale-down window is 1s
    await h.client.post("/system/scale/chat", json={"replicas": 2},
                        headers={"authorization": "Bearer test-token"})  # fmt: skip
    await wait_for(lambda: len(h.gateway.table.routable("chat")) == 2)
    await wait_for(lambda: len(h.node.unloads) == 1, timeout_s=4.0)
    await asyncio.sleep(0.3)
    assert len(h.node.unloads) == 1  # down to 1, not to 0: keep_alive holds the last one
    assert len(h.gateway.table.routable("chat")) == 1
