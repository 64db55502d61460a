"""The vLLM backend in a real instance process of a real node: weights from the DRAM tier
through the sllm_dram load format, generate, stream, cancel, drain; the backend choice for a
model vLLM's CPU attention cannot run. One vLLM engine for the whole module."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import httpx
import pytest

from sllm.instance_auth import auth_header
from sllm.messages import InstanceEvent
from sllm_cli.servers import ManagedServer
from tests.listeners import pid_on

from .conftest import VllmNode, VllmNodeClient, load_ready, vllm_record

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(vllm_node: VllmNode, vllm_nats: ManagedServer) -> InstanceEvent:
    ready = load_ready(vllm_node, vllm_nats, "v-serve", vllm_record("vchat"))
    assert ready.kind == "ready", ready.error
    return ready


async def _stream(http: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    async with http.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _transformers_greedy(
    vllm_node: VllmNode, prompt: str, n: int, checkpoint: str = "vtiny"
) -> list[int]:
    """What transformers' own generate makes of the same checkpoint, greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = vllm_node.hf_dirs[checkpoint]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return [int(t) for t in out[0, ids.shape[1] :]]


async def test_ready_reports_the_vllm_backend(served: InstanceEvent) -> None:
    assert served.backend == "vllm"
    assert served.backend_reason == "the function asks for vllm"


async def test_greedy_tokens_equal_transformers_generate(
    served: InstanceEvent, vllm_node: VllmNode
) -> None:
    """The weights vLLM loaded from the DRAM image are the checkpoint's: its greedy tokens are
    the ones transformers computes from the original Hugging Face directory."""
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=served.address, timeout=60, headers=auth_header(served.secret)
    ) as http:
        events = await _stream(http, body)
        answer = (await http.post("/v1/generate", json=body)).json()
    tokens = [t for e in events if isinstance(e, dict) for t in e.get("token_ids", [])]
    assert tokens == _transformers_greedy(vllm_node, PROMPT, 12)
    assert events[-1] == "[DONE]"
    finish = events[-2]
    assert finish["finish_reason"] == "length"
    assert finish["usage"]["completion_tokens"] == 12
    text = "".join(e.get("delta", "") for e in events if isinstance(e, dict))
    assert answer["text"] == text and answer["finish_reason"] == "length"
    assert answer["usage"] == finish["usage"]


async def test_stop_string_ends_the_stream_without_showing_it(served: InstanceEvent) -> None:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=served.address, timeout=60, headers=auth_header(served.secret)
    ) as http:
        full = (await http.post("/v1/generate", json=body)).json()["text"]
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        cut = (await http.post("/v1/generate", json={**body, "stop": stop})).json()
    assert stop and cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


async def test_client_disconnect_cancels_the_generation(served: InstanceEvent) -> None:
    # The generation cannot finish before the instance sees the disconnect, however fast the
    # engine: the instance is stopped (SIGSTOP) from the first token until the client has gone,
    # then continued with ~2,000 tokens still to generate.
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    assert served.address is not None
    pid = pid_on(served.address)
    async with httpx.AsyncClient(
        base_url=served.address, timeout=60, headers=auth_header(served.secret)
    ) as http:
        start = (await http.get("/healthz")).json()
        before = start["cancelled"]
        try:
            async with http.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        os.kill(pid, signal.SIGSTOP)
                        break  # the first token came: leave
        finally:
            os.kill(pid, signal.SIGCONT)
        for _ in range(500):
            health = (await http.get("/healthz")).json()
            if health["cancelled"] > before and health["in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
    assert health["cancelled"] == before + 1 and health["in_flight"] == 0
    # it stopped early, not at its end
    assert health["tokens_out"] - start["tokens_out"] < body["max_tokens"]


async def test_concurrent_streams_are_batched_and_each_complete(served: InstanceEvent) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=served.address, timeout=60, headers=auth_header(served.secret)
    ) as http:
        runs = await asyncio.gather(*[_stream(http, body) for _ in range(6)])
    token_lists = [
        [t for e in ev if isinstance(e, dict) for t in e.get("token_ids", [])] for ev in runs
    ]
    assert all(len(t) == 24 for t in token_lists)
    assert all(t == token_lists[0] for t in token_lists)  # greedy: batching changes nothing


async def _greedy_tokens(ready: InstanceEvent, n: int) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    headers = auth_header(ready.secret)
    async with httpx.AsyncClient(base_url=ready.address or "", timeout=60, headers=headers) as http:
        events = await _stream(http, body)
    return [t for e in events if isinstance(e, dict) for t in e.get("token_ids", [])]


def _engine_of(vllm_node: VllmNode, instance_id: str) -> str:
    """How the instance got its engine, from the node's ready log line."""
    for line in vllm_node.process.log_path.read_text().splitlines():
        if f"instance {instance_id} ready" in line:
            return line.split(" engine=", 1)[1].split()[0]
    raise AssertionError(f"no ready line for {instance_id}")


def _timings_of(vllm_node: VllmNode, instance_id: str) -> dict[str, float]:
    """The instance's load timings, from the node's ready log line."""
    for line in vllm_node.process.log_path.read_text().splitlines():
        if f"instance {instance_id} ready" in line:
            return dict(json.loads(line.split(" timings=", 1)[1]))
    raise AssertionError(f"no ready line for {instance_id}")


async def test_idle_vllm_process_keeps_an_engine_for_the_next_load(
    served: InstanceEvent, vllm_node: VllmNode, vclient: VllmNodeClient
) -> None:
    """After ``served`` came up, the idle vLLM process built an engine for its model: a second
    instance of the same model takes it as it is; one of another checkpoint with the same
    configuration gets its weights replaced in place (and computes with those, not the old
    ones: its greedy tokens are transformers' for its own checkpoint); one of another
    configuration is built on the KV cache memory the freed engine held."""
    same = vllm_record("vchat")
    kept = await _ready(vclient, "v-kept", same)
    assert _engine_of(vllm_node, "v-kept") == "kept"
    assert await _greedy_tokens(kept, 8) == _transformers_greedy(vllm_node, PROMPT, 8)
    await _stopped(vclient, "v-kept")

    reloaded = await _ready(vclient, "v-reload", vllm_record("vchat2", checkpoint="vtiny2"))
    assert _engine_of(vllm_node, "v-reload") == "reloaded"
    assert await _greedy_tokens(reloaded, 8) == _transformers_greedy(
        vllm_node, PROMPT, 8, checkpoint="vtiny2"
    )
    await _stopped(vclient, "v-reload")

    # Another configuration (a smaller KV cache): the idle process frees its prebuilt engine
    # and builds this one on the KV cache memory that engine held (runtime.backend.vllm_kv),
    # zeroed: the greedy tokens are still transformers' own.
    smaller = vllm_record("vchat3", memory_bytes=192 << 20)
    await _built_greedy(vllm_node, vclient, "v-other", smaller, "kv_cache_reused_s")

    # An instance whose budget leaves no room for a warm engine (more than this machine has):
    # the idle vLLM process frees its engine and its KV cache memory (it got the prebuild
    # line when it became idle, the release line after it), so the next load of that model
    # builds its engine, on freshly allocated KV cache memory.
    while (await vclient.heartbeat()).pool_idle < 2:  # both pools' processes idle
        pass
    await _ready(
        vclient, "t-big", vllm_record("tbig", backend="transformers", memory_bytes=1 << 50)
    )
    await _stopped(vclient, "t-big")  # its CPU slot, for the next load
    await _built_greedy(vllm_node, vclient, "v-again", smaller, "kv_cache_s")


async def _ready(
    vclient: VllmNodeClient, instance_id: str, record: dict[str, Any]
) -> InstanceEvent:
    assert (await vclient.load_record(instance_id, record)).ok
    ready = await vclient.event(instance_id, timeout_s=300.0)
    assert ready.kind == "ready", ready.error
    return ready


async def _stopped(vclient: VllmNodeClient, instance_id: str) -> None:
    assert (await vclient.unload(instance_id, 1.0)).ok
    assert (await vclient.event(instance_id)).kind == "stopped"


async def _built_greedy(
    vllm_node: VllmNode,
    vclient: VllmNodeClient,
    instance_id: str,
    record: dict[str, Any],
    kv_timing: str,
) -> None:
    """``record`` loads with an engine built, its KV cache as ``kv_timing`` says, and answers
    transformers' greedy tokens; then it is stopped."""
    ready = await _ready(vclient, instance_id, record)
    assert _engine_of(vllm_node, instance_id) == "built"
    timings = _timings_of(vllm_node, instance_id)
    assert kv_timing in timings
    # every weight a view of the DRAM image (the checkpoint laid out as vLLM fuses it), none
    # copied: the greedy tokens below are read through those views
    assert timings["weights_bound_bytes"] > 0 and timings["weights_copied_bytes"] == 0
    assert "warm_up_s" not in timings  # on CPU the first request is the first step
    assert await _greedy_tokens(ready, 8) == _transformers_greedy(vllm_node, PROMPT, 8)
    await _stopped(vclient, instance_id)


async def test_auto_falls_back_for_a_model_vllm_cannot_run(vclient: VllmNodeClient) -> None:
    """Head size 16: vLLM supports the architecture, its CPU attention not the head size."""
    record = vllm_record("t16", checkpoint="tiny16", backend="auto")
    assert (await vclient.load_record("t16-auto", record)).ok
    ready = await vclient.event("t16-auto", timeout_s=300.0)
    assert ready.kind == "ready", ready.error
    assert ready.backend == "transformers"
    assert ready.backend_reason.startswith("auto fell back to transformers: vLLM ")
    assert "no kernel for head size 16" in ready.backend_reason
    beat = await vclient.heartbeat()
    [state] = [i for i in beat.instances if i.instance_id == "t16-auto"]
    assert state.backend == "transformers" and "head size 16" in state.backend_reason
    assert (await vclient.unload("t16-auto", 1.0)).ok
    assert (await vclient.event("t16-auto")).kind == "stopped"

    forced = vllm_record("t16", checkpoint="tiny16", backend="vllm")
    assert (await vclient.load_record("t16-vllm", forced)).ok
    failed = await vclient.event("t16-vllm", timeout_s=60.0)
    assert failed.kind == "failed"
    assert failed.error.startswith("backend: vllm: vLLM ")
    assert "no kernel for head size 16" in failed.error


async def test_live_migration_moves_a_greedy_stream_token_for_token(
    served: InstanceEvent, vclient: VllmNodeClient
) -> None:
    """The source keeps decoding while the target stages the stream's tokens (vLLM prefix
    caching) in rounds; at the switch the stream ends with a ``migrated`` event, which the
    gateway's splice follows to the target: the client's tokens are the unmigrated run's."""
    from gateway.migration.splice import follow_moves
    from runtime.migration.protocol import Peer, migrate_requests
    from sllm.errors import SllmError

    target_record = vllm_record("vchat")
    assert (await vclient.load_record("v-target", target_record)).ok
    target = await vclient.event("v-target", timeout_s=300.0)
    assert target.kind == "ready", target.error
    source = served.address or ""
    body = {"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    rounds: list[tuple[str, int, int]] = []

    async def progress(phase: str, round_: int, tokens: int) -> None:
        rounds.append((phase, round_, tokens))

    mine, theirs = auth_header(served.secret), auth_header(target.secret)
    async with httpx.AsyncClient(timeout=120) as http:
        reference = (await http.post(f"{source}/v1/generate", json=body, headers=mine)).json()

        async def resume(moved: dict[str, Any]) -> Any:  # as the gateway does, its secret
            url = f"{moved['target_address']}/v1/migration/resume"
            request = http.build_request("POST", url, json=moved, headers=theirs)
            response = await http.send(request, stream=True)
            if response.status_code != 200:
                raise SllmError(f"resume answered {response.status_code}")
            return response.aiter_bytes()

        async def client() -> list[Any]:
            request = http.build_request(
                "POST", f"{source}/v1/generate", headers=mine,
                json={**body, "stream": True, "request_id": "mv"},
            )  # fmt: skip
            response = await http.send(request, stream=True)
            assert response.status_code == 200
            chunks = response.aiter_bytes()
            spliced = follow_moves(await anext(chunks), chunks, resume)
            raw = b"".join([chunk async for chunk in spliced])
            return [
                json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
                for line in raw.split(b"\n")
                if line.startswith(b"data: ")
            ]

        streaming = asyncio.create_task(client())
        for _ in range(1000):  # move it once it has its first tokens
            listed = await http.get(f"{source}/v1/migration/requests", headers=mine)
            requests = listed.json()["requests"]
            if requests and len(requests[0]["output_ids"]) >= 2:
                break
            await asyncio.sleep(0.01)
        outcome = await migrate_requests(
            http, Peer(source, served.secret), Peer(target.address or "", target.secret),
            "v-target",
            max_rounds=3, threshold_tokens=8, progress=progress,
        )  # fmt: skip
        events = await streaming
    assert outcome.moved == 1 and outcome.rounds >= 1, outcome
    assert rounds[0][0] == "round" and rounds[-1][0] == "switched"
    tokens = [t for e in events if isinstance(e, dict) for t in e.get("token_ids", [])]
    assert len(tokens) == 1500
    text = "".join(e.get("delta", "") for e in events if isinstance(e, dict))
    assert text == reference["text"]
    assert events[-2] == {"finish_reason": "length", "usage": reference["usage"]}
    assert (await vclient.unload("v-target", 1.0)).ok
    assert (await vclient.event("v-target")).kind == "stopped"


async def test_drain_finishes_in_flight_streams_then_stops(
    served: InstanceEvent, vclient: VllmNodeClient
) -> None:
    """Last in the module: it unloads the served instance."""
    long = {"prompt": PROMPT, "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(
        base_url=served.address, timeout=60, headers=auth_header(served.secret)
    ) as http:
        in_flight = asyncio.create_task(_stream(http, long))
        for _ in range(500):
            if (await http.get("/healthz")).json()["in_flight"]:
                break
            await asyncio.sleep(0.01)
        assert (await vclient.unload("v-serve", 30.0)).ok
        refused = await http.post("/v1/generate", json=long)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        events = await in_flight
    assert events[-1] == "[DONE]" and events[-2]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 150
    assert (await vclient.event("v-serve")).kind == "stopped"
