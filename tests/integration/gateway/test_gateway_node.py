"""Gateway + one real node + the real NATS server: a cold request starts an instance and is
answered; 20 concurrent cold requests cause exactly one wake; scale to zero after keep_alive;
the openai client, streaming and not; a gateway restart keeps the registry (and finds the
running instance again)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from sllm_cli.servers import port_open

from .conftest import AUTH, Cluster

pytestmark = pytest.mark.integration


def metric(cluster: Cluster, name: str) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def describe(cluster: Cluster, name: str) -> dict[str, object]:
    r = httpx.get(f"{cluster.url}/system/functions/{name}", headers=AUTH, timeout=5)
    assert r.status_code == 200, r.text
    result: dict[str, object] = r.json()
    return result


def test_a_cold_request_starts_an_instance_and_gets_an_answer(cluster: Cluster) -> None:
    cluster.deploy("tiny", min=0, max=1, keep_alive="10m")
    assert describe(cluster, "tiny")["instances"] == []
    r = httpx.post(
        f"{cluster.url}/function/tiny", json={"prompt": "hello", "max_tokens": 4}, timeout=120
    )
    assert r.status_code == 200, r.text + cluster.log_tail("gateway.log")
    answer = r.json()
    assert isinstance(answer["text"], str) and answer["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] <= 4
    info = describe(cluster, "tiny")
    assert info["replicas"] == {"ready": 1, "starting": 0, "desired": 1}
    (inst,) = info["instances"]  # type: ignore[misc]
    assert inst["state"] == "ready" and inst["address"].startswith("http://127.0.0.1:")
    assert metric(cluster, 'sllm_cold_starts_total{function="tiny"') == 1
    # The node now caches the checkpoint; describe says where.
    deadline = time.monotonic() + 10
    while not describe(cluster, "tiny")["cache"]:
        assert time.monotonic() < deadline, "no cache entry reported"
        time.sleep(0.2)
    (where,) = describe(cluster, "tiny")["cache"]  # type: ignore[misc]
    assert "dram" in where["tiers"]


def test_the_openai_client_streaming_and_not(cluster: Cluster) -> None:
    client = openai.OpenAI(
        base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120
    )
    assert "tiny" in [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "Say hi"}]
    answer = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,  # type: ignore[arg-type]
        temperature=0,
    )
    text = answer.choices[0].message.content
    assert isinstance(text, str)
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 6
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    streamed, usage = "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            streamed += choice.delta.content or ""
    assert streamed == text  # greedy: the same tokens either way
    assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens
    done = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0)
    assert isinstance(done.choices[0].text, str) and done.usage is not None
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]


def test_instance_logs_reach_the_gateway(cluster: Cluster) -> None:
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"{cluster.url}/system/logs/tiny?tail=5", headers=AUTH, timeout=5)
        assert r.status_code == 200
        if r.json():
            break
        assert time.monotonic() < deadline, "no log line of tiny's instance arrived"
        time.sleep(0.2)
    assert all(line["node"] and line["instance_id"].startswith("tiny-") for line in r.json())


def test_function_stream_passes_native_events_through(cluster: Cluster) -> None:
    events = []
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster.url}/function/tiny", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    assert "usage" in json.loads(events[-2])


async def test_twenty_concurrent_cold_requests_cause_exactly_one_wake(cluster: Cluster) -> None:
    cluster.deploy("burst", min=0, max=1, target_concurrency=32, keep_alive="2s")
    body = {"prompt": "hi", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        replies = await asyncio.gather(
            *(client.post("/function/burst", json=body) for _ in range(20))
        )
    assert [r.status_code for r in replies] == [200] * 20, [
        r.text for r in replies if r.status_code != 200
    ]
    assert metric(cluster, 'sllm_wakes_total{function="burst"}') == 1
    assert metric(cluster, 'sllm_cold_starts_total{function="burst"') == 1
    assert metric(cluster, 'sllm_queue_wait_seconds_count{function="burst"}') >= 1


def test_scale_to_zero_after_keep_alive(cluster: Cluster) -> None:
    # "burst" has keep_alive 2s: its instance drains and stops; the node frees the device.
    deadline = time.monotonic() + 60
    while describe(cluster, "burst")["instances"]:
        assert time.monotonic() < deadline, "burst did not scale to zero:\n" + cluster.log_tail(
            "gateway.log"
        )
        time.sleep(0.2)
    # The node's next heartbeats agree (it may still be finishing the drain).
    while True:
        nodes = httpx.get(f"{cluster.url}/system/nodes", headers=AUTH, timeout=5).json()
        if not [i for n in nodes for i in n["instances"] if i["function"] == "burst"]:
            break
        assert time.monotonic() < deadline, f"the node still runs burst: {nodes}"
        time.sleep(0.2)
    # (Waking again after zero is covered in tests/unit/gateway/test_invoke.py.)


def test_a_gateway_restart_keeps_the_registry_and_finds_running_instances(cluster: Cluster) -> None:
    before = httpx.get(f"{cluster.url}/system/functions", headers=AUTH, timeout=5).json()
    running = [i["id"] for i in describe(cluster, "tiny")["instances"]]  # type: ignore[union-attr]
    assert running
    cluster.stop_gateway()
    cluster.start_gateway()
    after = httpx.get(f"{cluster.url}/system/functions", headers=AUTH, timeout=5).json()
    assert [(f["name"], f["revision"], f["checkpoint"]) for f in after] == [
        (f["name"], f["revision"], f["checkpoint"]) for f in before
    ]
    cluster.wait_for_node()
    r = httpx.post(
        f"{cluster.url}/function/tiny", json={"prompt": "again", "max_tokens": 2}, timeout=120
    )
    assert r.status_code == 200, r.text + cluster.log_tail("gateway.log")
    assert [i["id"] for i in describe(cluster, "tiny")["instances"]] == running  # type: ignore[union-attr]
    assert metric(cluster, 'sllm_wakes_total{function="tiny"}') == 0


def test_a_stopping_gateway_answers_on_the_connections_it_has(cluster: Cluster) -> None:
    """SIGTERM: new connections are refused at once, but a request a client sends on its
    kept-alive connection still gets its answer, with ``Connection: close``, rather than a
    connection closed under it (the client could not tell whether it had been taken)."""
    assert cluster.gateway is not None
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # its connection is kept, idle
        cluster.gateway.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", cluster.port):  # until new connections are refused
            assert time.monotonic() < deadline, "the stopping gateway still accepts connections"
            time.sleep(0.01)
        r = client.get("/healthz")
        assert r.status_code == 200 and r.headers["connection"] == "close"
    assert cluster.gateway.wait(30) in (0, -signal.SIGTERM)
    cluster.gateway = None
    cluster.start_gateway()
