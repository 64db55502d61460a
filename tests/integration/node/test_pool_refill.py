"""The pool is refilled once a new instance answered its first request, not beside it: a
refilling process (torch imported, DRAM images mapped, models built) made that request's
first token take 0.7-2.2 s instead of 0.12 s on the 2-core VM. The instance says ``quiet``
(``runtime.instance.worker.FirstAnswer``) and the node refills then, or
``SLLM_POOL_REFILL_AFTER`` after ready when no request came (``Supervisor._follow``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from runtime.ckpt.convert import convert_checkpoint
from runtime.instance.load_spec import LoadSpec
from runtime.node.instance_record import Instance
from runtime.node.supervisor import Supervisor
from runtime.node.worker_process import ProcessLauncher
from sllm.spec import FunctionRecord, FunctionSpec
from tests.loaded import dram_entry


async def test_an_instance_says_quiet_once_its_first_request_was_answered(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_model_dir, ckpt)
    entry = dram_entry(ckpt, tmp_path / "dram")
    worker = await ProcessLauncher({"SLLM_INSTANCE_THREADS": "1"}).spawn()
    try:
        await worker.wait_idle()
        spec = LoadSpec(
            instance_id="i", function="f", handler="completion", entry_dir=str(entry),
            device="cpu:0", host="127.0.0.1", threads=1, secret="s3cret",
        )  # fmt: skip
        await worker.send(spec.to_json())
        ready = await worker.next_event(120)
        assert ready["event"] == "ready", ready
        url = f"http://127.0.0.1:{ready['port']}"
        auth = {"Authorization": "Bearer s3cret"}
        async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60) as http:
            assert (await http.get("/healthz")).status_code == 200
            body = {"prompt": "hello", "max_tokens": 4, "stream": True}
            async with http.stream("POST", "/v1/generate", json=body) as stream:
                assert "data: [DONE]" in [line async for line in stream.aiter_lines()]
            assert await worker.next_event(30) == {"event": "quiet"}
            second = await http.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2})
            assert second.is_success
        await worker.send({"cmd": "drain", "drain_s": 5})
        # once only: the line after quiet is the drain's answer
        assert (await worker.next_event(30))["event"] == "draining"
    finally:
        worker.kill()
        await worker.wait()


async def test_first_answer_waits_for_a_request_answered_and_none_in_flight() -> None:
    """A health probe is no request; a request still running keeps the instance busy."""
    from runtime.instance.worker import FirstAnswer

    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("path") == "/v1/generate":
            await release.wait()

    first = FirstAnswer(app)
    await first({"type": "http", "path": "/healthz"}, None, None)
    assert not first.answered.is_set()
    running = asyncio.create_task(first({"type": "http", "path": "/v1/generate"}, None, None))
    await first({"type": "lifespan"}, None, None)  # the server's start-up: no request
    await asyncio.sleep(0)
    assert first.active == 1 and not first.answered.is_set()
    release.set()
    await running
    assert first.answered.is_set() and first.active == 0


class _Backend:
    """Counts refills (``InstanceBackend.replenish``)."""

    def __init__(self) -> None:
        self.refills = 0
        self.refilled = asyncio.Event()

    def replenish(self) -> None:
        self.refills += 1
        self.refilled.set()


class _Worker:
    """The control lines of a ready instance, handed over by the test."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def next_event(self, timeout_s: float | None) -> dict[str, Any]:
        from sllm.errors import Unavailable

        line = await self.lines.get()
        if line is None:
            raise Unavailable("exited")
        return line


def _supervisor(backend: _Backend, tmp_path: Path, refill_after_s: float) -> Supervisor:
    return Supervisor(
        "n", "127.0.0.1", cache=None, backend=backend, devices=None,  # type: ignore[arg-type]
        publish_event=None, publish_log=None, cpu_slots=1,  # type: ignore[arg-type]
        handler_root=tmp_path, refill_after_s=refill_after_s,
    )  # fmt: skip


def _instance() -> Instance:
    return Instance("i", "f", "cpu:0", FunctionRecord(FunctionSpec(name="f", model="m"), "c", 1))


async def test_the_node_refills_once_at_quiet_before_the_instance_ends(tmp_path: Path) -> None:
    backend, worker = _Backend(), _Worker()
    supervisor = _supervisor(backend, tmp_path, refill_after_s=3600)
    inst = _instance()
    follow = asyncio.create_task(supervisor._follow(inst, worker))  # type: ignore[arg-type]
    await worker.lines.put({"event": "draining"})
    await asyncio.wait_for(inst.drain_started.wait(), 30)  # the line was read
    assert backend.refills == 0
    await worker.lines.put({"event": "quiet"})
    await asyncio.wait_for(backend.refilled.wait(), 30)
    await worker.lines.put(None)  # the instance exits: its load's ``finally`` refills
    await follow
    assert backend.refills == 1  # the quiet's; the deadline's timer was cancelled


async def test_the_node_refills_after_the_deadline_when_no_request_came(tmp_path: Path) -> None:
    backend, worker = _Backend(), _Worker()
    supervisor = _supervisor(backend, tmp_path, refill_after_s=0.05)
    follow = asyncio.create_task(supervisor._follow(_instance(), worker))  # type: ignore[arg-type]
    await asyncio.wait_for(backend.refilled.wait(), 30)  # the deadline's refill, no quiet
    await worker.lines.put(None)
    await follow
    assert backend.refills == 1
