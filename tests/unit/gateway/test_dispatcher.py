"""Routing rule and cold-start queue on a manual clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dispatcher import Dispatcher, pick
from gateway.instances import Instance, InstanceTable
from sllm.clock import ManualClock
from sllm.errors import NotFound, Overloaded, Unavailable


def inst(
    iid: str, in_flight: int = 0, state: str = "ready", revision: int = 1, since: float = 0
) -> Instance:
    return Instance(iid, "f", "n", "cpu0", revision, state, since, f"http://{iid}", in_flight)


def test_pick_fewest_in_flight_current_revision_first() -> None:
    a, b, c = inst("a", 3), inst("b", 1), inst("c", 0, state="starting")
    assert pick([a, b, c], 1, ()) is b
    assert pick([a, b, c], 1, {"b"}) is a
    old = inst("old", 0, revision=1)
    new = inst("new", 5, revision=2)
    assert pick([old, new], 2, ()) is new
    assert pick([old], 2, ()) is old  # the old revision serves until the new one is ready
    assert pick([inst("d", state="draining"), inst("u", state="unreachable")], 1, ()) is None


def make(
    queue_size: int = 3, wake_s: float = 10.0
) -> tuple[Dispatcher, InstanceTable, ManualClock, list[str]]:
    table, clock, woken = InstanceTable(), ManualClock(), []
    return Dispatcher(table, clock, queue_size, wake_s, woken.append), table, clock, woken


async def test_queued_requests_are_released_in_arrival_order() -> None:
    d, table, _, woken = make()
    order: list[int] = []

    async def request(i: int) -> None:
        got, _ = await d.acquire("f", 1)
        order.append(i)
        assert got.instance_id == "a"

    tasks = [asyncio.create_task(request(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert d.queued("f") == 3 and woken == ["f", "f", "f"]
    table.instances["a"] = inst("a")
    assert d.release_waiters("f", 1) == 3
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert table.instances["a"].in_flight == 3


async def test_a_full_queue_is_overloaded_with_retry_after() -> None:
    d, _, _, _ = make(queue_size=2)
    waiting = [asyncio.create_task(d.acquire("f", 1)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await d.acquire("f", 1)
    assert info.value.retry_after_s >= 1
    d.fail_waiters("f", Unavailable("x"))
    for t in waiting:
        with pytest.raises(Unavailable):
            await t


async def test_the_wake_deadline_runs_on_the_injected_clock() -> None:
    d, _, clock, _ = make(wake_s=10.0)
    task = asyncio.create_task(d.acquire("f", 1))
    for _ in range(3):  # let the deadline's sleep start (ManualClock reads now() on entry)
        await asyncio.sleep(0)
    clock.advance(9.0)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(1.5)
    with pytest.raises(Unavailable, match="wake deadline"):
        await task
    assert d.queued("f") == 0


async def test_new_arrivals_do_not_overtake_the_queue() -> None:
    d, table, _, _ = make()
    first = asyncio.create_task(d.acquire("f", 1))
    await asyncio.sleep(0)
    table.instances["a"] = inst("a")
    # An instance is ready but its event has not been handled yet: the waiter is served first.
    newcomer = d.try_acquire("f", 1)
    assert first.done() or d.queued("f") == 0
    got, _ = await first
    assert got.instance_id == "a" and newcomer is table.instances["a"]
    assert table.instances["a"].in_flight == 2


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    d, _, _, _ = make()
    task = asyncio.create_task(d.acquire("f", 1))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert d.queued("f") == 0


async def test_deleting_a_function_fails_its_waiters_with_404() -> None:
    d, _, _, _ = make()
    task = asyncio.create_task(d.acquire("f", 1))
    await asyncio.sleep(0)
    d.forget("f")
    with pytest.raises(NotFound):
        await task


async def test_a_retry_waiting_for_another_instance_does_not_block_new_requests() -> None:
    d, table, _, _ = make()
    table.instances["a"] = inst("a")
    retry = asyncio.create_task(d.acquire("f", 1, exclude={"a"}))  # "a" failed it once
    await asyncio.sleep(0)
    assert d.queued("f") == 1
    got = d.try_acquire("f", 1)
    assert got is not None and got.instance_id == "a"
    table.instances["b"] = inst("b")
    assert d.release_waiters("f", 1) == 1
    served, _ = await retry
    assert served.instance_id == "b"


async def test_retry_after_is_the_expected_wait_not_a_constant() -> None:
    # issue 14: Retry-After was max(1, min(30, wake_timeout / 10)) whatever the state
    table, clock = InstanceTable(), ManualClock()
    starting: dict[str, float | None] = {"f": 7.4}
    d = Dispatcher(table, clock, 1, 300.0, lambda f: None, expected_start=starting.get)
    first = asyncio.create_task(d.acquire("f", 1))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await d.acquire("f", 1)
    assert info.value.retry_after_s == pytest.approx(7.4)  # until the starting one is ready
    clock.advance(3.0)
    table.instances["a"] = inst("a")
    d.release_waiters("f", 1)
    await first
    starting["f"] = None
    second = asyncio.create_task(d.acquire("f", 1, exclude={"a"}))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await d.acquire("f", 1, exclude={"a"})
    assert info.value.retry_after_s == pytest.approx(3.0)  # what the queue waited lately
    d.fail_waiters("f", Unavailable("x"))
    with pytest.raises(Unavailable):
        await second
