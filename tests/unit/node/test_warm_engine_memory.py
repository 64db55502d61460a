"""Warm engines are held only in memory nobody else was promised: the pool sends ``prebuild``
when one engine per idle process fits, ``release`` when an instance needs that memory, and
an idle process frees its engine and KV cache memory on ``release``. The pool talks to real
child processes that echo what they are sent."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runtime.backend.vllm_kv import KvArena
from runtime.instance.worker import Idle
from runtime.node.instance_record import Instance
from runtime.node.supervisor import Supervisor
from runtime.node.worker_pool import WorkerPool
from runtime.node.worker_process import WorkerProcess
from sllm.spec import FunctionRecord, FunctionSpec, Resources

GiB = 1 << 30

# an idle process that says it is idle, then sends back every line it is sent
ECHO = """
import json, sys
print(json.dumps({"event": "idle"}), flush=True)
for line in sys.stdin:
    print(json.dumps({"event": "got", "line": json.loads(line)}), flush=True)
"""


class EchoLauncher:
    async def spawn(self, background: bool = False) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ECHO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        return WorkerProcess(proc, time.monotonic())


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    pool = WorkerPool(1, EchoLauncher(), backend="vllm")
    pool.replenish()
    worker, _ = await pool.take()  # started: back into the pool as its idle process
    pool._idle.append(worker)
    yield pool
    await pool.close()


async def received(worker: WorkerProcess) -> dict[str, Any]:
    message = await worker.next_event(10.0)
    assert message["event"] == "got"
    line: dict[str, Any] = message["line"]
    return line


SPEC = {"function": "chat", "entry_dir": "/dram/chat", "memory_bytes": 2 * GiB}


async def test_a_warm_engine_that_fits_is_built_and_given_back_when_an_instance_needs_it(
    pool: WorkerPool,
) -> None:
    [worker] = pool._idle
    await pool.set_prebuild(SPEC, room_bytes=3 * GiB)
    assert await received(worker) == {"cmd": "prebuild", "spec": SPEC}
    await pool.fit_prebuild(room_bytes=2 * GiB)  # still fits: nothing sent
    await pool.fit_prebuild(room_bytes=1 * GiB)  # an instance took the rest
    assert await received(worker) == {"cmd": "release"}
    assert pool.prebuilds == []
    await pool.set_prebuild(SPEC, room_bytes=3 * GiB)  # the next ready instance asks again
    assert await received(worker) == {"cmd": "prebuild", "spec": SPEC}


async def test_a_warm_engine_that_does_not_fit_is_not_built(pool: WorkerPool) -> None:
    [worker] = pool._idle
    await pool.set_prebuild(SPEC, room_bytes=2 * GiB - 1)
    assert pool.prebuilds == []
    await pool.set_prebuild({**SPEC, "memory_bytes": GiB}, room_bytes=2 * GiB - 1)
    # the first line the process got is the prebuild that fits: nothing was sent before it
    assert (await received(worker))["spec"]["memory_bytes"] == GiB
    # a later one that does not fit frees the engine the process holds
    await pool.set_prebuild(SPEC, room_bytes=2 * GiB - 1)
    assert await received(worker) == {"cmd": "release"}


@pytest.fixture
async def pool2() -> AsyncIterator[WorkerPool]:
    """A vLLM pool of two idle (echoing) processes."""
    pool = WorkerPool(2, EchoLauncher(), backend="vllm")
    pool.replenish()
    await asyncio.gather(*pool._starting)
    assert pool.idle == 2
    yield pool
    await pool.close()


async def stopped(worker: WorkerProcess) -> None:
    """A process ``take`` handed out (no longer the pool's to stop), stopped."""
    worker.kill()
    await worker.wait()


CHAT, CODE = SPEC, {"function": "code", "entry_dir": "/dram/code", "memory_bytes": GiB}


async def holders(pool: WorkerPool, lines: int) -> dict[str, int]:
    """Read the next ``lines`` lines the idle processes got: entry -> how many now hold it."""
    got: dict[str, int] = {}
    for worker in pool._idle[:lines]:
        line = await received(worker)
        entry = line["spec"]["entry_dir"] if line["cmd"] == "prebuild" else "released"
        got[entry] = got.get(entry, 0) + 1
    return got


async def test_two_processes_keep_the_engines_of_the_two_models_loaded_last(
    pool2: WorkerPool,
) -> None:
    first, second = pool2._idle
    await pool2.set_prebuild(CHAT, room_bytes=8 * GiB)
    assert await holders(pool2, 2) == {"/dram/chat": 2}  # one model: both build it
    await pool2.set_prebuild(CODE, room_bytes=8 * GiB)
    # one process switches to the new model, the other keeps the one it holds
    assert await received(second) == {"cmd": "prebuild", "spec": CODE}
    assert [s["function"] for s in pool2.prebuilds] == ["code", "chat"]
    # a load takes the process holding its model's engine, whichever came first
    taken, pre_started = await pool2.take("/dram/code")
    assert taken is second and pre_started
    await stopped(taken)
    # chat loaded again: the other process (chat's engine) is not asked to rebuild anything
    await pool2.set_prebuild(CHAT, room_bytes=8 * GiB)
    assert [s["function"] for s in pool2.prebuilds] == ["chat", "code"]
    pool2.replenish()  # the process that replaces the taken one builds what is missing: code
    await asyncio.gather(*pool2._starting)
    third = pool2._idle[1]
    assert await received(third) == {"cmd": "prebuild", "spec": CODE}
    taken, _ = await pool2.take("/dram/chat")
    assert taken is first
    await stopped(taken)


async def test_the_least_recent_model_gives_way_when_both_do_not_fit(pool2: WorkerPool) -> None:
    first, second = pool2._idle
    await pool2.set_prebuild(CHAT, room_bytes=8 * GiB)
    await holders(pool2, 2)
    await pool2.set_prebuild(CODE, room_bytes=3 * GiB)  # code + chat: 3 GiB, fits
    assert await received(second) == {"cmd": "prebuild", "spec": CODE}
    # an instance took memory: chat's engine (2 GiB) gives way to a second one of code's
    await pool2.fit_prebuild(room_bytes=3 * GiB - 1)
    assert await received(first) == {"cmd": "prebuild", "spec": CODE}
    assert [s["function"] for s in pool2.prebuilds] == ["code"]
    await pool2.fit_prebuild(room_bytes=2 * GiB - 1)  # not even one each: both released
    assert await holders(pool2, 2) == {"released": 2}
    assert pool2.prebuilds == []


async def test_a_load_of_another_model_takes_a_process_without_an_engine_first(
    pool2: WorkerPool,
) -> None:
    second = pool2._idle[1]
    pool2._idle.reverse()  # the process without an engine is not the first in line
    await pool2.set_prebuild(CHAT, room_bytes=8 * GiB)
    pool2._held.pop(second.pid)  # as if it had just started, holding nothing yet
    taken, _ = await pool2.take("/dram/other")
    assert taken is second
    await stopped(taken)
    # with only engines left, the least recent model's process goes
    await pool2.set_prebuild(CODE, room_bytes=8 * GiB)
    pool2.replenish()
    await asyncio.gather(*pool2._starting)
    held = {pool2._held[w.pid]: w for w in pool2._idle}
    assert set(held) == {"/dram/chat", "/dram/code"}
    taken, _ = await pool2.take("/dram/other")
    assert taken is held["/dram/chat"]
    await stopped(taken)


async def test_a_spare_process_holds_no_engine_and_takes_a_model_no_process_holds() -> None:
    pool = WorkerPool(1, EchoLauncher(), backend="vllm", spare=1)
    try:
        pool.replenish()
        assert len(pool._starting) == 1  # the spare starts once the other is idle
        while pool._starting:  # the first, then the spare it started
            await asyncio.gather(*pool._starting)
        assert pool.idle == 2
        await pool.set_prebuild(CHAT, room_bytes=8 * GiB)
        [holder] = [w for w in pool._idle if w.pid in pool._held]
        [spare] = [w for w in pool._idle if w is not holder]
        assert await received(holder) == {"cmd": "prebuild", "spec": CHAT}
        # another model's load takes the spare: nothing to free before its build
        taken, pre_started = await pool.take("/dram/code")
        assert taken is spare and pre_started
        await stopped(taken)
        pool.replenish()  # the taken one's replacement
        await asyncio.gather(*pool._starting)
        assert pool.idle == 2
        [refill] = [w for w in pool._idle if w is not holder]
        pool._idle.reverse()  # the process without an engine is first in line
        # the next model's engine goes to the process that holds one; the refill stays spare
        await pool.set_prebuild(CODE, room_bytes=8 * GiB)
        assert await received(holder) == {"cmd": "prebuild", "spec": CODE}
        assert pool._held == {holder.pid: "/dram/code"}
        taken, _ = await pool.take("/dram/code")
        assert taken is holder
        await stopped(taken)
        assert pool._idle == [refill]
    finally:
        await pool.close()


def test_a_pool_of_no_processes_keeps_no_spare() -> None:
    assert WorkerPool(0, EchoLauncher(), backend="vllm", spare=1).spare == 0


class Held:
    """A warm engine's stand-in: records that it was closed."""

    def __init__(self) -> None:
        self.closed = ""

    def close(self, reason: str) -> None:
        self.closed = reason


def test_an_idle_process_frees_its_warm_engine_and_kv_memory_on_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from runtime.backend import vllm_kv

    arena = KvArena()
    with arena.lending(1 << 20) as lease:
        kv = torch.zeros(1 << 20, dtype=torch.int8)
    assert arena.capacity == 1 << 20
    assert arena.free() == 0  # an engine still holds it
    del kv
    arena.release(lease)
    monkeypatch.setattr(vllm_kv, "ARENA", arena)
    idle = Idle(vllm=True)
    engine = Held()
    idle.warm = type("Warm", (), {"backend": engine, "entry": "/dram/chat"})()
    idle.release()
    assert idle.warm is None and engine.closed.startswith("released")
    assert arena.capacity == 0
    idle.release()  # nothing held: nothing to do


def test_room_is_the_memory_no_cpu_instance_and_no_dram_tier_was_promised(
    tmp_path: Path,
) -> None:
    supervisor = Supervisor(
        "n", "127.0.0.1", cache=None, backend=None, devices=None,  # type: ignore[arg-type]
        publish_event=None, publish_log=None, cpu_slots=2,  # type: ignore[arg-type]
        handler_root=tmp_path, memory_bytes=16 * GiB, dram_capacity=4 * GiB,
    )  # fmt: skip
    assert supervisor.prebuild_room() == 12 * GiB

    def instance(name: str, device: str, memory: int) -> Instance:
        spec = FunctionSpec(name=name, model="m", resources=Resources(memory_bytes=memory))
        return Instance(name, name, device, FunctionRecord(spec, f"checkpoints/{name}", 1))

    supervisor.instances["a"] = instance("a", "cpu:0", 3 * GiB)
    supervisor.instances["b"] = instance("b", "cuda:0", 40 * GiB)  # the GPU's memory
    assert supervisor.prebuild_room() == 9 * GiB
