"""Stopping background tasks for good.

``task.cancel()`` asks; it does not make the task end. On Python 3.11 a cancellation can be
lost inside ``asyncio.wait_for`` (CPython gh-86296: the awaited future completes in the loop
turn of the cancel, and ``wait_for`` returns its result instead of raising; nats-py's requests
use it), and the task's loop then carries on. Awaiting such a task after one ``cancel()`` waits
forever. Seen in two full test runs: a gateway stopped by SIGTERM never finished its shutdown,
and its lease loop, cancelled at the start of the stop, went on stepping (and took the lease
34 s later). ``cancel_all`` cancels again until every task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# 1 s between cancels: a task that honours its cancel ends within a loop turn or two.
RECANCEL_S = 1.0


async def cancel_all(tasks: Iterable[asyncio.Future[Any]], recancel_s: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again every ``recancel_s``
    those still running (and naming them in a warning). Their results and errors are dropped."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        if pending:
            names = ", ".join(sorted(_name(t) for t in pending))
            log.warning("tasks still running after a cancel, cancelled again: %s", names)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an error of a task being stopped is not news


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
