"""Hands each request an instance: the ready one with the fewest in-flight requests, or a place
in the function's bounded cold-start queue until one is ready.

- ``pick`` is the pure routing rule.
- A full queue raises ``Overloaded`` (429 + Retry-After: the expected wait, see
  ``retry_after``); a wait past the wake deadline raises ``Unavailable`` (503, naming the last
  reason a start failed, if one did). The wake deadline is separate from the request timeout:
  it bounds only the wait for an instance, not the generation that follows.
- ``release_waiters`` hands queued requests out in arrival order when an instance is ready.
- The first request that has to wait pokes the controller (``on_wait``); the controller decides
  how many instances to start (one per burst, see ``autoscaler``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from gateway.instances import Instance, InstanceTable
from sllm.clock import Clock
from sllm.errors import NotFound, Overloaded, Unavailable


def pick(
    candidates: Collection[Instance], revision: int, exclude: Collection[str]
) -> Instance | None:
    """The ready instance with the fewest in-flight requests; the current revision first (older
    revisions keep serving until a new one is ready); ties go to the longest-ready one."""
    best: Instance | None = None
    best_key: tuple[int, int, float] | None = None
    for inst in candidates:
        if inst.state != "ready" or inst.instance_id in exclude or not inst.address:
            continue
        key = (0 if inst.revision == revision else 1, inst.in_flight, inst.since)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    return best


@dataclass
class _Waiter:
    future: asyncio.Future[Instance]
    exclude: frozenset[str]
    enqueued: float


class Dispatcher:
    def __init__(
        self,
        table: InstanceTable,
        clock: Clock,
        queue_size: int,
        wake_timeout_s: float,
        on_wait: Callable[[str], None],
        expected_start: Callable[[str], float | None] = lambda function: None,
    ) -> None:
        """``expected_start(function)``: seconds until a starting instance of it should be
        ready (the placement's estimate), None when none is starting."""
        self._table = table
        self._clock = clock
        self._queue_size = queue_size
        self._wake_timeout_s = wake_timeout_s
        self._on_wait = on_wait
        self._expected_start = expected_start
        self._queues: dict[str, deque[_Waiter]] = {}
        self._waited: dict[str, float] = {}  # moving average of queue waits, seconds
        self._last_failure: dict[str, str] = {}

    def note_failure(self, function: str, reason: str) -> None:
        """A start of ``function`` failed in a way worth retrying; queued requests keep
        waiting, and one that reaches the wake deadline is told this reason."""
        self._last_failure[function] = reason

    def retry_after(self, function: str) -> float:
        """Seconds a refused request had best wait: the longer of how long queued requests
        waited lately (a moving average) and the time until the instance being started
        should be ready, within [1 s, the wake deadline]; 1 s when nothing is known yet."""
        start = self._expected_start(function) or 0.0
        wait = max(start, self._waited.get(function, 0.0))
        return max(1.0, min(self._wake_timeout_s, wait))

    def queued(self, function: str) -> int:
        queue = self._queues.get(function)
        return len(queue) if queue else 0

    def in_flight(self, function: str) -> int:
        return sum(i.in_flight for i in self._table.of(function))

    def try_acquire(
        self, function: str, revision: int, exclude: Collection[str] = ()
    ) -> Instance | None:
        """A ready instance with its in-flight count taken, or None. Never waits."""
        if self.queued(function):
            # Arrival order: those already waiting go first. Any left after this cannot use
            # the ready instances (a retry excluding the one that failed it).
            self.release_waiters(function, revision)
        inst = pick(self._table.routable(function), revision, exclude)
        if inst is not None:
            inst.in_flight += 1
        return inst

    async def acquire(
        self, function: str, revision: int, exclude: Collection[str] = ()
    ) -> tuple[Instance, float]:
        """An instance with its in-flight count taken, and the seconds spent queued."""
        inst = self.try_acquire(function, revision, exclude)
        if inst is not None:
            return inst, 0.0
        queue = self._queues.setdefault(function, deque())
        if len(queue) >= self._queue_size:
            retry = self.retry_after(function)
            raise Overloaded(
                f"function {function!r}: cold-start queue is full ({self._queue_size} waiting); "
                f"retry in {retry:.0f}s",
                retry_after_s=retry,
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), frozenset(exclude), self._clock.now())
        queue.append(waiter)
        self._on_wait(function)
        deadline: asyncio.Future[Any] = asyncio.ensure_future(
            self._clock.sleep(self._wake_timeout_s)
        )
        pending: set[asyncio.Future[Any]] = {waiter.future, deadline}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(function, waiter)
            raise
        finally:
            deadline.cancel()
        if not waiter.future.done():
            self._abandon(function, waiter)
            last = self._last_failure.get(function)
            raise Unavailable(
                f"function {function!r}: no instance became ready within "
                f"{self._wake_timeout_s:g}s (wake deadline)"
                + (f"; the last start failed: {last}" if last else "")
            )
        return waiter.future.result(), self._clock.now() - waiter.enqueued

    def release(self, inst: Instance) -> None:
        """A request finished on ``inst``."""
        inst.in_flight = max(0, inst.in_flight - 1)

    def release_waiters(self, function: str, revision: int) -> int:
        """Hand queued requests of ``function`` to ready instances, in arrival order; a waiter
        no ready instance can take (it excludes them) keeps its place without blocking those
        behind it."""
        queue = self._queues.get(function)
        if not queue:
            return 0
        routable = self._table.routable(function)
        handed = 0
        kept: deque[_Waiter] = deque()
        while queue:
            waiter = queue.popleft()
            if waiter.future.done():
                continue
            inst = pick(routable, revision, waiter.exclude) if routable else None
            if inst is None:
                kept.append(waiter)
                continue
            inst.in_flight += 1
            waiter.future.set_result(inst)
            handed += 1
            waited = self._clock.now() - waiter.enqueued
            before = self._waited.get(function)
            # 0.2: the average follows a change of regime within ~10 requests
            self._waited[function] = waited if before is None else 0.8 * before + 0.2 * waited
        if handed:
            self._last_failure.pop(function, None)
        queue.extend(kept)
        return handed

    def fail_waiters(self, function: str, error: Exception) -> int:
        """Fail every queued request of ``function`` (its wake failed, or it was deleted)."""
        queue = self._queues.pop(function, None)
        failed = 0
        while queue:
            waiter = queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
                failed += 1
        return failed

    def forget(self, function: str) -> None:
        self.fail_waiters(function, NotFound(f"function {function!r} was deleted"))
        self._waited.pop(function, None)
        self._last_failure.pop(function, None)

    def _abandon(self, function: str, waiter: _Waiter) -> None:
        queue = self._queues.get(function)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
        if (
            waiter.future.done()
            and not waiter.future.cancelled()
            and waiter.future.exception() is None
        ):
            self.release(waiter.future.result())  # handed an instance as we gave up
        elif not waiter.future.done():
            waiter.future.cancel()
