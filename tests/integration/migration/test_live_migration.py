"""Live migration between two real nodes, through the gateway (function ``mig``: one instance
on each node): streams moved mid-way give the same output as unmigrated runs (greedy and
seeded, native and OpenAI SSE), five streams move together, a target killed before the switch
leaves the source serving with nothing lost, and a source killed mid-stream or mid-migration
ends the stream with a clear error."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.listeners import pid_on

from .conftest import FUNCTION, MAX_TOKENS, Stage

pytestmark = pytest.mark.integration


class Run:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.events: list[Any] = []
        self.errors: list[Any] = []


async def native_stream(http: httpx.AsyncClient, body: dict[str, Any]) -> Run:
    run = Run()
    async with http.stream("POST", f"/function/{FUNCTION}", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            event = data if data == "[DONE]" else json.loads(data)
            run.events.append(event)
            if isinstance(event, dict) and "error" in event:
                run.errors.append(event)
            if isinstance(event, dict) and "token_ids" in event:
                run.tokens.extend(event["token_ids"])
                run.text += event["delta"]
    return run


async def reference(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """The unmigrated answer: a JSON (non-stream) request is never moved (it finishes where it
    runs), so it can run alongside the stream (a request gives the same tokens alone or
    batched)."""
    r = await http.post(f"/function/{FUNCTION}", json={**body, "stream": False})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def migrate_stream(stage: Stage, request_id: str | None = None) -> httpx.Response:
    """Once the stream ``request_id`` (None: the only one) has its first tokens, migrate the
    instance running it to the other node."""
    source = await asyncio.to_thread(stage.serving, request_id)
    (target,) = [n for n in stage.nodes if n != source["node"]]
    return await asyncio.to_thread(stage.migrate, target, instance=source["id"])


def rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# Greedy prompts whose output runs to MAX_TOKENS with this model (no early end of sequence:
# each runs past 1,300 tokens). The engine does not wait for a slow reader, so on a busy
# machine it can be far ahead of what the client has read: the tests watch the engine's
# streams (not what they have read) and move a stream once it has its first tokens, and no
# stream may end early, or a migration could find nothing left to move.
LONG_PROMPTS = ("The capital of France", "What is love", "Why?")


async def test_greedy_stream_moves_mid_way_token_for_token(stage: Stage) -> None:
    body = {"prompt": LONG_PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    request_id = rid("greedy")
    async with httpx.AsyncClient(base_url=stage.url, timeout=120) as http:
        ref = asyncio.create_task(reference(http, body))
        mover = asyncio.create_task(migrate_stream(stage, request_id))
        moved = await native_stream(http, {**body, "request_id": request_id})
        response = await mover
        unmoved = await ref
    assert response.status_code == 200, response.text + stage.logs()
    outcome = response.json()
    assert outcome["moved"] >= 1 and outcome["rounds"] >= 1 and not outcome["target"]["loaded"]
    assert moved.errors == [] and moved.text == unmoved["text"]
    assert len(moved.tokens) == unmoved["usage"]["completion_tokens"] == MAX_TOKENS
    assert moved.events[-2] == {
        "finish_reason": unmoved["finish_reason"],
        "usage": unmoved["usage"],
    }
    assert moved.events[-1] == "[DONE]"
    nodes = {i["node"] for i in stage.wait_ready(2)}  # the source's device is refilled
    assert nodes == set(stage.nodes)


async def test_seeded_openai_stream_moves_identically(stage: Stage) -> None:
    body = {  # runs past MAX_TOKENS with this model and seed (no early end of sequence)
        "model": FUNCTION,
        "messages": [{"role": "user", "content": "Tell me about Paris"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.9,
        "seed": 77,
    }

    async def answer(http: httpx.AsyncClient) -> Any:
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def stream(http: httpx.AsyncClient) -> tuple[str, Any]:
        text, usage = "", None
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        # request_id is not an OpenAI field: find the stream by elimination instead
        async with http.stream("POST", "/v1/chat/completions", json=streamed) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                usage = chunk.get("usage") or usage
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
        return text, usage

    async with httpx.AsyncClient(base_url=stage.url, timeout=120) as http:
        ref = asyncio.create_task(answer(http))
        moving = asyncio.create_task(migrate_stream(stage))  # the only stream running
        text, usage = await stream(http)
        response = await moving
        unmoved = await ref
    assert response.status_code == 200 and response.json()["moved"] == 1, response.text
    assert text == unmoved["choices"][0]["message"]["content"] and usage == unmoved["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    stage.wait_ready(2)


async def test_five_concurrent_streams_move_together(stage: Stage) -> None:
    # (prompt, temperature, seed) that run past MAX_TOKENS with this model: none can end on
    # the source before the migration reaches it, however busy the machine
    picks = [("The capital of France", 0.8, 9), ("The sky", 0.0, 0),
             ("The sky", 0.7, 11), ("Once upon a time", 0.8, 2), ("Dear diary", 0.8, 9)]  # fmt: skip
    bodies = [
        {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": t, "seed": s} for p, t, s in picks
    ]
    # Twelve streams, about six per instance (the gateway sends each to the least busy one): the
    # six or more of the busier instance move together while the target keeps serving its own.
    ids = [rid(f"five{i}") for i in range(12)]

    async def mover() -> tuple[httpx.Response, dict[str, int]]:
        # once all twelve are decoding, the busier instance's streams move
        (source, on_source), _ = await asyncio.to_thread(stage.wait_streams, set(ids), 1)
        (target,) = [n for n in stage.nodes if n != source["node"]]
        return await asyncio.to_thread(stage.migrate, target, instance=source["id"]), on_source

    async with httpx.AsyncClient(base_url=stage.url, timeout=180) as http:
        runs = [
            asyncio.create_task(native_stream(http, {**bodies[i % 5], "request_id": ids[i]}))
            for i in range(len(ids))
        ]
        moving = asyncio.create_task(mover())
        references = await asyncio.gather(*(reference(http, b) for b in bodies))
        done = await asyncio.gather(*runs)
        response, on_source = await moving
    assert response.status_code == 200, response.text
    # the gateway spreads streams by in-flight count: about half of them on each instance
    outcome = response.json()
    assert outcome["moved"] >= 5 and outcome["finished"] == 0, (on_source, outcome)
    for i, run in enumerate(done):
        ref = references[i % 5]
        assert run.errors == [] and run.text == ref["text"]
        assert len(run.tokens) == ref["usage"]["completion_tokens"] == MAX_TOKENS
    stage.wait_ready(2)


async def migrate_frozen(
    stage: Stage, source: dict[str, Any], target: dict[str, Any], then: Callable[[], None]
) -> httpx.Response:
    """Migrate ``source`` to ``target`` while the target process is stopped (SIGSTOP): the
    migration cannot pass its first round. Once the source's node has started it, ``then()``
    runs (the fault), and the target continues (SIGCONT; a no-op if ``then`` killed it)."""
    target_pid = pid_on(target["address"])
    os.kill(target_pid, signal.SIGSTOP)
    try:
        moving = asyncio.create_task(
            asyncio.to_thread(stage.migrate, target["node"], instance=source["id"])
        )
        await asyncio.to_thread(stage.wait_log, source["node"], f"start instance={source['id']}")
        then()
    finally:
        os.kill(target_pid, signal.SIGCONT)
    return await moving


async def test_target_killed_before_switch_source_continues(stage: Stage) -> None:
    body = {"prompt": LONG_PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}
    request_id = rid("kill-target")
    stage.wait_ready(2)

    async def mover() -> tuple[httpx.Response, dict[str, Any], dict[str, Any]]:
        source = await asyncio.to_thread(stage.serving, request_id)
        (target,) = [i for i in stage.instances() if i["id"] != source["id"]]
        pid = pid_on(target["address"])
        return (
            await migrate_frozen(stage, source, target, lambda: os.kill(pid, signal.SIGKILL)),
            source,
            target,
        )

    async with httpx.AsyncClient(base_url=stage.url, timeout=120) as http:
        ref = asyncio.create_task(reference(http, body))
        moving = asyncio.create_task(mover())
        run = await native_stream(http, {**body, "request_id": request_id})
        response, source, target = await moving
        unmoved = await ref
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "migration_failed"
    # Nothing lost: the source kept decoding the stream to its end, and keeps serving.
    assert run.errors == [] and run.text == unmoved["text"]
    assert len(run.tokens) == unmoved["usage"]["completion_tokens"] == MAX_TOKENS
    assert source["id"] in {i["id"] for i in stage.wait_ready(2, gone=target["id"])}


async def test_source_killed_mid_stream_ends_with_clear_error(stage: Stage) -> None:
    body = {"prompt": LONG_PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0}
    request_id = rid("kill-source")

    async def kill() -> str:
        source = await asyncio.to_thread(stage.serving, request_id)
        os.kill(pid_on(source["address"]), signal.SIGKILL)
        return str(source["id"])

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stage.url, timeout=120) as http:
        killing = asyncio.create_task(kill())
        run = await asyncio.wait_for(native_stream(http, {**body, "request_id": request_id}), 60)
        killed = await killing
    assert time.monotonic() - started < 60  # ended, no hang
    assert len(run.tokens) < MAX_TOKENS
    assert len(run.errors) == 1 and run.events[-1] == run.errors[0]
    assert run.errors[0]["error"]["code"] in ("instance_failed", "migration_failed")
    stage.wait_ready(2, gone=killed)  # the function gets its lost instance back


async def test_source_killed_mid_migration_ends_with_clear_error(stage: Stage) -> None:
    body = {"prompt": LONG_PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    request_id = rid("kill-source-mid")
    stage.wait_ready(2)

    killed: list[str] = []

    async def mover() -> httpx.Response:
        source = await asyncio.to_thread(stage.serving, request_id)
        (target,) = [i for i in stage.instances() if i["id"] != source["id"]]
        pid = pid_on(source["address"])  # the source dies during the first round
        killed.append(source["id"])
        return await migrate_frozen(stage, source, target, lambda: os.kill(pid, signal.SIGKILL))

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stage.url, timeout=120) as http:
        moving = asyncio.create_task(mover())
        run = await asyncio.wait_for(native_stream(http, {**body, "request_id": request_id}), 60)
        response = await moving
    assert time.monotonic() - started < 60  # ended, no hang
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "migration_failed"
    # The stream ends with one clear error after the tokens it had, never silently.
    assert len(run.tokens) < MAX_TOKENS
    assert len(run.errors) == 1 and run.events[-1] == run.errors[0]
    assert run.errors[0]["error"]["code"] in ("instance_failed", "migration_failed")
    stage.wait_ready(2, gone=killed[0])  # the function gets its second instance back
