"""The node with real NATS and real instance processes: load by command, generate, stream,
unload; two instances on two CPU slots; a killed instance; every bad input of issue 4."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import msgpack
import psutil
import pytest

from sllm.instance_auth import auth_header, new_secret
from sllm.messages import InstanceEvent, LoadCmd, encode

from .conftest import NodeClient, record

pytestmark = pytest.mark.integration


def _pid_listening_on(address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
            return conn.pid
    raise AssertionError(f"nothing listens on {address}")


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, object]) -> list[object]:
    events: list[object] = []
    async with http.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def _refuses_strangers(client: NodeClient, ready: InstanceEvent) -> None:
    """The data plane: an instance answers nothing without its secret, migration endpoints
    included (a forged export, handoff or resume is 401), logs each refusal, and listens only
    on the node's address (SLLM_NODE_HOST, 127.0.0.1 here; 127.0.0.2 is the same loopback
    interface, another address)."""
    assert ready.secret.startswith("sllmi_") and ready.secret not in repr(ready)
    calls = [
        ("GET", "/healthz", {}),
        ("POST", "/v1/generate", {}),
        ("GET", "/v1/migration/requests", auth_header(new_secret())),
        ("POST", "/v1/migration/handoff", {"authorization": ready.secret}),
        ("POST", "/v1/migration/resume", auth_header(ready.secret + "x")),
    ]
    async with httpx.AsyncClient(base_url=str(ready.address), timeout=30) as http:
        for method, path, headers in calls:
            r = await http.request(method, path, json={}, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            line = await client.log_line("refused")
            assert f"{method} {path}" in line.line and ready.secret not in line.line
    port = int(str(ready.address).rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(f"http://127.0.0.2:{port}/healthz")


async def test_load_generate_stream_unload(client: NodeClient) -> None:
    reply = await client.load("inst-a", "cpu:0")
    assert reply.ok, reply
    assert reply.data["device"] == "cpu:0"
    again = await client.load("inst-a", "cpu:0")  # idempotent by instance id
    assert again.ok and again.data["device"] == "cpu:0"
    ready = await client.event("inst-a")
    assert ready.kind == "ready", ready.error
    assert ready.address and ready.tier in ("store", "ssd", "dram") and ready.load_s > 0
    await _refuses_strangers(client, ready)

    secret = auth_header(ready.secret)
    async with httpx.AsyncClient(base_url=ready.address, timeout=60, headers=secret) as http:
        health = (await http.get("/healthz")).json()
        assert health["state"] == "ready" and health["instance_id"] == "inst-a"
        body = {"prompt": "hello world", "max_tokens": 8, "temperature": 0, "seed": 1}
        out = (await http.post("/v1/generate", json=body)).json()
        assert out["finish_reason"] in ("stop", "length")
        assert out["usage"]["total_tokens"] == (
            out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        )
        events = await _stream(http, "/v1/generate", body)
        assert events[-1] == "[DONE]"
        final = events[-2]
        assert isinstance(final, dict) and final["usage"] == out["usage"]
        deltas = [e for e in events[:-2] if isinstance(e, dict)]
        assert "".join(str(e["delta"]) for e in deltas) == out["text"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert (await http.post("/v1/invoke", json=chat)).status_code == 200
        bad = await http.post("/v1/generate", json={"prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]

    beat = await client.heartbeat()
    [inst] = [i for i in beat.instances if i.instance_id == "inst-a"]
    assert inst.state == "ready" and inst.device == "cpu:0"
    assert any(e.checkpoint.startswith("checkpoints/tiny") for e in beat.cache["dram"])
    assert {d.device: d.instance_id for d in beat.devices}["cpu:0"] == "inst-a"

    # unload while a stream is in flight: it finishes, new requests get 503 meanwhile
    long = {"prompt": "hello", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=ready.address, timeout=60, headers=secret) as http:
        in_flight = asyncio.create_task(_stream(http, "/v1/generate", long))
        for _ in range(500):
            if (await http.get("/healthz")).json()["in_flight"]:
                break
            await asyncio.sleep(0.01)
        # an eviction: unload, then at once a load for the same device, which waits for it
        assert (await client.unload("inst-a", 30.0)).ok
        refused = await http.post("/v1/generate", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        queued = await client.load("inst-b", "cpu:0", function="other")
        events = await in_flight
    assert events[-1] == "[DONE]"
    assert isinstance(events[-2], dict) and events[-2]["finish_reason"] == "length"
    assert queued.ok and queued.data["device"] == "cpu:0", queued
    assert (await client.event("inst-a")).kind == "stopped"
    assert (await client.unload("inst-a")).ok  # unload is idempotent too
    ready_b = await client.event("inst-b")
    assert ready_b.kind == "ready" and ready_b.tier == "dram", ready_b.error
    assert (await client.unload("inst-b", 1.0)).ok
    assert (await client.event("inst-b")).kind == "stopped"
    beat = await client.heartbeat()
    assert all(d.instance_id is None for d in beat.devices)


async def test_two_instances_on_two_cpu_slots_and_one_killed(client: NodeClient) -> None:
    replies = await asyncio.gather(client.load("two-0"), client.load("two-1"))
    assert all(r.ok for r in replies), replies
    assert {r.data["device"] for r in replies} == {"cpu:0", "cpu:1"}
    ready = [await client.event("two-0"), await client.event("two-1")]
    assert [e.kind for e in ready] == ["ready", "ready"], [e.error for e in ready]
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as http:
        outs = await asyncio.gather(
            *(
                http.post(f"{e.address}/v1/generate", json=body, headers=auth_header(e.secret))
                for e in ready
            )
        )
    texts = [o.json()["text"] for o in outs]
    assert texts[0] == texts[1]  # same model, greedy: same answer from either instance
    third = await client.load("two-2")
    assert not third.ok and third.code == "unavailable"
    busy = await client.load("two-3", replies[0].data["device"])
    assert not busy.ok and busy.code == "conflict" and "in use" in busy.message

    # kill two-1's process mid-stream: the stream breaks, the node reports it, frees its
    # device, and two-0 keeps serving
    doomed = ready[1]
    assert doomed.address
    pid = _pid_listening_on(doomed.address)
    long = {"prompt": "hello", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as http:

        async def stream() -> None:
            async with http.stream(
                "POST",
                f"{doomed.address}/v1/generate",
                json=long | {"stream": True},
                headers=auth_header(doomed.secret),
            ) as r:
                async for _ in r.aiter_lines():
                    os.kill(pid, signal.SIGKILL)

        with pytest.raises(httpx.HTTPError):
            await stream()
        failed = await client.event("two-1")
        assert failed.kind == "failed" and "exited with code -9" in failed.error
        still = await http.post(
            f"{ready[0].address}/v1/generate", json=body, headers=auth_header(ready[0].secret)
        )
        assert still.status_code == 200 and still.json()["text"] == texts[0]
    beat = await client.heartbeat()
    assert {d.device: d.instance_id for d in beat.devices}[replies[1].data["device"]] is None
    assert [i.instance_id for i in beat.instances] == ["two-0"]
    assert (await client.unload("two-0", 1.0)).ok
    assert (await client.event("two-0")).kind == "stopped"


async def test_malformed_and_unknown_version_commands_get_error_replies(
    client: NodeClient,
) -> None:
    reply = await client.command(b"\xc1 not msgpack")
    assert not reply.ok and reply.code == "protocol_error"
    wrong = msgpack.packb({"v": 99, "type": "load", "body": {}})
    reply = await client.command(wrong)
    assert not reply.ok and "version" in reply.message
    reply = await client.command(msgpack.packb({"v": 1, "type": "load", "body": {"x": 1}}))
    assert not reply.ok and "unknown field(s) 'x'" in reply.message  # strict on receipt
    reply = await client.command(msgpack.packb({"v": 1, "type": "load", "body": {}}))
    assert not reply.ok and "missing field" in reply.message
    bad_record = LoadCmd("bad-rec", "tiny", {"spec": {}}, "")
    reply = await client.command(encode(bad_record))
    assert not reply.ok and "record" in reply.message
    await client.heartbeat()  # still up


async def test_missing_checkpoint_is_a_failed_load(client: NodeClient) -> None:
    rec = record()
    rec["checkpoint"] = "checkpoints/tiny/does-not-exist"
    assert (await client.command(encode(LoadCmd("ghost", "tiny", rec, "")))).ok
    failed = await client.event("ghost")
    assert failed.kind == "failed" and "does-not-exist" in failed.error
    beat = await client.heartbeat()
    assert all(d.instance_id is None for d in beat.devices)


async def test_handler_import_error_is_a_failed_load_and_custom_handlers_work(
    client: NodeClient,
) -> None:
    broken = {"broken.py": "import no_such_module_anywhere\n"}
    reply = await client.load("h-bad", handler="broken:handle", handler_source=broken)
    assert reply.ok
    failed = await client.event("h-bad")
    assert failed.kind == "failed"
    assert "no_such_module_anywhere" in failed.error and "ModuleNotFoundError" in failed.error

    source = {
        "echo.py": (
            "def load(model, tokenizer, env):\n"
            "    return {'greeting': env.get('GREETING', 'hi')}\n"
            "def handle(request, ctx):\n"
            "    out = ctx.generate(prompt=request['q'], max_tokens=3, temperature=0)\n"
            "    return {'greeting': ctx.state['greeting'], 'tokens': out['usage']['completion_tokens']}\n"
        )
    }
    assert (await client.load("h-ok", handler="echo:handle", handler_source=source)).ok
    ready = await client.event("h-ok")
    assert ready.kind == "ready", ready.error
    async with httpx.AsyncClient(timeout=60) as http:
        out = await http.post(
            f"{ready.address}/v1/invoke", json={"q": "hello"}, headers=auth_header(ready.secret)
        )
    assert out.json() == {"greeting": "hi", "tokens": 3}
    assert (await client.unload("h-ok", 1.0)).ok
    assert (await client.event("h-ok")).kind == "stopped"
