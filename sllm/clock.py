"""Injected time (STYLE.md 3): one protocol, the real clock only at the composition root."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """The time port: a monotonic ``now`` and a ``sleep`` on the same scale."""

    def now(self) -> float:
        """Seconds on a monotonic scale (not wall time)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock's scale."""


class SystemClock:
    """The real monotonic clock (used only where the program is wired together)."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock tests advance by hand; ``sleep`` returns once the clock has been advanced."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._changed = asyncio.Event()

    def now(self) -> float:
        """The time the test has advanced to."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds`` and wake the sleepers that are due."""
        self._now += seconds
        self._changed.set()
        self._changed = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has been advanced past now + ``seconds``."""
        deadline = self._now + seconds
        while self._now < deadline:
            await self._changed.wait()
