"""sllm.tasks.cancel_all: background tasks end for good, even one whose cancel was lost."""

from __future__ import annotations

import asyncio

from sllm.tasks import cancel_all


async def test_a_task_that_loses_its_cancel_is_cancelled_again_until_it_ends() -> None:
    lost = 0

    async def loop() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if lost < 2:  # as a library's wait_for on Python 3.11 can: carry on
                    lost += 1
                    continue
                raise

    async def polite() -> None:
        await asyncio.sleep(10)

    async def failed() -> None:
        raise RuntimeError("broke while running")

    tasks = [asyncio.create_task(f(), name=f.__name__) for f in (loop, polite, failed)]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(tasks, recancel_s=0.05), 5)
    assert all(t.done() for t in tasks) and lost == 2
    assert tasks[0].cancelled() and tasks[1].cancelled()
    assert isinstance(tasks[2].exception(), RuntimeError)
