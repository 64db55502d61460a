"""The leader's scale state in KV (gateway.scale_state): what one leader writes, the next one
reads back; desired counts are coalesced and survive a failed flush; start records are written
at once and go when the instance is seen."""

from __future__ import annotations

import asyncio

import pytest

from gateway.scale_state import ScaleState
from sllm.bus import MemoryKeyValue
from sllm.clock import ManualClock
from sllm.errors import Unavailable
from sllm.messages import StartRecord


class FlakyKeyValue(MemoryKeyValue):
    """Writes fail while ``down``, as an unreachable bucket's do."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writes = 0

    async def put(self, key: str, value: bytes) -> None:
        if self.down:
            raise Unavailable("bucket unreachable")
        self.writes += 1
        await super().put(key, value)

    async def delete(self, key: str) -> None:
        if self.down:
            raise Unavailable("bucket unreachable")
        self.writes += 1
        await super().delete(key)


def start(instance_id: str, function: str = "chat") -> StartRecord:
    return StartRecord(instance_id, function, "node-a", "cpu0", 1, term=7)


async def test_the_next_leader_reads_what_the_last_one_wrote() -> None:
    kv = FlakyKeyValue()
    old = ScaleState(kv, ManualClock())
    old.set_desired("chat", 3, term=7)
    old.set_desired("code", 1, term=7)
    await old.booked(start("chat-1"))
    await old.booked(start("chat-2"))
    old.seen("chat-1")
    await old.flush()

    resumed = await ScaleState(kv, ManualClock()).load()
    assert resumed.desired == {"chat": 3, "code": 1}
    assert resumed.starting == [start("chat-2")]


async def test_desired_counts_are_coalesced_and_unchanged_ones_not_rewritten() -> None:
    kv = FlakyKeyValue()
    state = ScaleState(kv, ManualClock())
    for n in (1, 2, 3, 2):
        state.set_desired("chat", n, term=1)
    await state.flush()
    assert kv.writes == 1
    state.set_desired("chat", 2, term=1)
    await state.flush()
    assert kv.writes == 1  # the value in KV already
    state.forget("never-written")
    await state.flush()
    assert kv.writes == 1
    assert (await ScaleState(kv, ManualClock()).load()).desired == {"chat": 2}


async def test_a_failed_flush_is_retried_and_a_newer_value_wins() -> None:
    kv = FlakyKeyValue()
    state = ScaleState(kv, ManualClock())
    state.set_desired("chat", 2, term=1)
    kv.down = True
    await state.flush()
    state.set_desired("chat", 4, term=1)  # decided while the bucket was away
    kv.down = False
    await state.flush()
    assert (await ScaleState(kv, ManualClock()).load()).desired == {"chat": 4}


async def test_a_start_record_is_written_before_the_caller_goes_on() -> None:
    kv = FlakyKeyValue()
    state = ScaleState(kv, ManualClock())
    await state.booked(start("chat-9"))
    assert kv.writes == 1  # not staged: written when booked() returns
    kv.down = True
    with pytest.raises(Unavailable):
        await state.booked(start("chat-10"))


async def test_unreadable_records_are_skipped() -> None:
    kv = FlakyKeyValue()
    await kv.put("desired.chat", b"not msgpack")
    await kv.put("desired.code", b"\x93")
    state = ScaleState(kv, ManualClock())
    state.set_desired("ok", 1, term=1)
    await state.flush()
    assert (await ScaleState(kv, ManualClock()).load()).desired == {"ok": 1}


async def test_the_flush_loop_runs_on_the_injected_clock() -> None:
    kv = FlakyKeyValue()
    clock = ManualClock()
    state = ScaleState(kv, clock, flush_s=0.25)
    task = asyncio.create_task(state.run())
    try:
        state.set_desired("chat", 1, term=1)
        await asyncio.sleep(0)
        assert kv.writes == 0
        clock.advance(0.25)
        for _ in range(10):
            await asyncio.sleep(0)
        assert kv.writes == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class SlowKeyValue(MemoryKeyValue):
    """A put of a key in ``held`` waits for ``release``; every put is logged in order done."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[str] = set()
        self.release = asyncio.Event()
        self.done: list[str] = []

    async def put(self, key: str, value: bytes) -> int:
        if key in self.held:
            await self.release.wait()
        revision = await super().put(key, value)
        self.done.append(key)
        return revision


async def test_a_flush_waits_for_the_one_in_progress() -> None:
    # The leader flushes the desired count before a load's start record; a background flush
    # already writing that count made the second flush return at once, and the start record
    # could land first (a takeover then saw a load nothing asked for).
    kv = SlowKeyValue()
    kv.held.add("desired.chat")
    state = ScaleState(kv, ManualClock())
    state.set_desired("chat", 1, term=1)
    background = asyncio.create_task(state.flush())
    await asyncio.sleep(0)  # it took the staged count and is writing it

    async def load() -> None:
        await state.flush()
        await state.booked(StartRecord("chat-1", "chat", "node-a", "cpu:0", 1, 1))

    sending = asyncio.create_task(load())
    await asyncio.sleep(0.01)
    assert kv.done == []  # the start record waits for the count
    kv.release.set()
    await asyncio.gather(background, sending)
    assert kv.done == ["desired.chat", "start.chat-1"]
