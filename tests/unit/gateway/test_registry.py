"""The registry over a KeyValue bucket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.registry import Registry
from sllm.bus import KvEntry, MemoryKeyValue
from sllm.errors import Conflict, NotFound, ValidationFailed
from sllm.spec import FunctionRecord, FunctionSpec


def record(name: str = "chat", checkpoint: str = "k1") -> FunctionRecord:
    return FunctionRecord(
        FunctionSpec(name=name, model="m"), checkpoint, 10, handler_source={"a.py": "x"}
    )


async def test_create_update_delete_and_reload() -> None:
    kv = MemoryKeyValue()
    reg = Registry(kv)
    await reg.create(record())
    with pytest.raises(Conflict):
        await reg.create(record())
    updated = await reg.update(
        "chat", FunctionRecord(FunctionSpec(name="chat", model="m2"), "k2", 20)
    )
    assert (updated.revision, updated.checkpoint, updated.handler_source) == (2, "k2", {})
    with pytest.raises(ValidationFailed, match="does not match"):
        await reg.update("chat", record("other"))
    again = Registry(kv)
    await again.load()
    assert again.get("chat") == updated
    await again.delete("chat")
    with pytest.raises(NotFound):
        again.get("chat")
    assert await kv.keys() == []


async def test_an_unreadable_record_is_skipped_not_fatal() -> None:
    kv = MemoryKeyValue()
    await Registry(kv).create(record("good"))
    await kv.put("fn.bad", b"{not json")
    await kv.put("fn.worse", b'{"spec": {"name": "Bad Name", "model": "m"}}')
    reg = Registry(kv)
    await reg.load()
    assert [r.spec.name for r in reg.all()] == ["good"]


async def wait_until(predicate, timeout_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def test_the_copy_follows_the_bucket_whoever_writes() -> None:
    # issue 14: the in-memory copy follows the bucket (another gateway's writes, late ones)
    kv = MemoryKeyValue()
    ours, theirs = Registry(kv), Registry(kv)
    await ours.load()
    await theirs.load()
    changes: list[tuple[str, int | None]] = []
    ours.on_change(lambda name, rec: changes.append((name, rec.revision if rec else None)))
    await theirs.create(record())
    await wait_until(lambda: ours.find("chat") is not None)
    await theirs.update("chat", record(checkpoint="k2"))
    await wait_until(lambda: ours.get("chat").revision == 2)
    assert ours.get("chat").checkpoint == "k2"
    await theirs.delete("chat")
    await wait_until(lambda: ours.find("chat") is None)
    assert changes == [("chat", 1), ("chat", 2), ("chat", None)]
    await ours.stop()
    await theirs.stop()


async def test_a_write_while_the_bucket_is_down_fails_and_changes_nothing() -> None:
    from sllm.errors import Unavailable

    kv = MemoryKeyValue()
    reg = Registry(kv)
    await reg.load()
    await reg.create(record())
    kv.down = True
    with pytest.raises(Unavailable):
        await reg.delete("chat")
    with pytest.raises(Unavailable):
        await reg.create(record("other"))
    assert reg.find("chat") is not None and reg.find("other") is None  # the copy serves on
    kv.down = False
    assert await kv.keys() == ["fn.chat"]
    await reg.stop()


async def test_two_concurrent_updates_cannot_both_win() -> None:
    kv = MemoryKeyValue()
    a, b = Registry(kv), Registry(kv)
    await a.load()
    await a.create(record())
    await b.load()
    await a.update("chat", record(checkpoint="from-a"))
    # b has not seen a's update yet only if its watch lags; force the race by hand:
    b._revisions["fn.chat"] = 1
    with pytest.raises(Conflict, match="changed meanwhile"):
        await b.update("chat", record(checkpoint="from-b"))
    await a.stop()
    await b.stop()


class StallingKeyValue(MemoryKeyValue):
    """A bucket whose next watches misbehave as ``plans`` say: "silent" never delivers
    anything (a watch started while NATS reconnects), "short" ends after the first entry,
    before the snapshot's end, "slow" delivers each entry 0.2 s after the last, "empty" ends
    its snapshot at once (a server still loading its streams). ``cut`` ends the running watch at its next entry."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[str] = []
        self.cut = False

    async def watch(self) -> AsyncIterator[KvEntry | None]:
        import asyncio

        plan = self.plans.pop(0) if self.plans else "whole"
        if plan == "silent":
            await asyncio.Event().wait()
        inner = super().watch()
        skipping = plan == "empty"
        try:
            async for entry in inner:
                if skipping:  # the snapshot's entries are dropped, its end marker kept
                    if entry is not None:
                        continue
                    skipping = False
                if self.cut:
                    self.cut = False
                    return
                if plan == "slow":
                    await asyncio.sleep(0.2)
                yield entry
                if plan == "short":
                    return
        finally:
            await inner.aclose()  # type: ignore[attr-defined]


async def test_a_watch_that_stalls_or_ends_short_is_watched_again_and_deletes_nothing() -> None:
    # seen in a fault run: a watch started while NATS reconnected never delivered its
    # snapshot, and the copy missed every later change (a deleted function kept its instance)
    kv = StallingKeyValue()
    reg = Registry(kv, retry_s=0.01, snapshot_s=0.3)
    await reg.create(record("a"))
    await reg.create(record("b"))
    await reg.load()
    deleted: list[str] = []
    reg.on_change(lambda name, rec: deleted.append(name) if rec is None else None)
    kv.plans = ["silent", "short"]
    kv.cut = True
    await kv.put("other", b"x")  # the running watch ends at this entry
    await wait_until(lambda: reg.resyncs == 1, timeout_s=5.0)
    assert kv.plans == [] and deleted == []  # the short snapshot did not drop "b"
    await kv.delete("fn.a")  # and the copy follows the bucket again
    await wait_until(lambda: reg.find("a") is None)
    assert deleted == ["a"] and reg.find("b") is not None
    await reg.stop()


async def test_a_slow_snapshot_that_keeps_coming_is_not_cut() -> None:
    kv = StallingKeyValue()
    for name in "abcd":
        await Registry(kv).create(record(name))
    kv.plans = ["slow"]  # 5 entries (4 and the end marker), 1 s in all: over 0.3 s, never silent
    reg = Registry(kv, retry_s=0.01, snapshot_s=0.3)
    await reg.load()
    assert [r.spec.name for r in reg.all()] == ["a", "b", "c", "d"] and reg.resyncs == 0
    await reg.stop()


async def test_an_empty_snapshot_takes_only_what_is_really_gone_for_deleted() -> None:
    # seen in a full run: a watch made as the restarted server came up reported an empty bucket,
    # and the copy dropped a function nobody had deleted
    kv = StallingKeyValue()
    reg = Registry(kv, retry_s=0.01)
    await reg.create(record("a"))
    await reg.create(record("b"))
    await reg.load()
    kv.plans = ["empty"]
    kv.cut = True
    await kv.delete("fn.a")  # ends the running watch: the copy never hears of this delete
    await wait_until(lambda: reg.resyncs == 1)
    assert reg.find("a") is None  # really gone: asked for, not found
    assert reg.find("b") is not None  # missing from the empty snapshot, but there
    await reg.stop()
