"""Repeated identical warnings and errors, rate-limited in the log.

A fault makes a loop fail the same way every turn (a gateway tick every 0.5 s finding no node,
a node whose heartbeat cannot be sent every 2 s): 13.5k identical lines in 25 s were seen
(issue 14). ``RepeatFilter`` lets the first of a kind through, drops identical ones (same
logger, level and text) for ``window_s``, and the first one after that says how many it
stood for. INFO and below pass untouched: those are state changes, one line each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

# 10 s: an operator still sees a persisting fault every 10 s, a burst costs one line.
WINDOW_S = 10.0
_MAX_KINDS = 1000  # bounds the memory of kinds seen (oldest forgotten first)


@dataclass
class _Seen:
    since: float
    dropped: int = 0


class RepeatFilter(logging.Filter):
    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str], _Seen] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        key = (record.name, record.levelno, text)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.since < self.window_s:
            seen.dropped += 1
            return False
        if seen is not None and seen.dropped:
            record.msg = f"{text} (repeated {seen.dropped} more times in {self.window_s:g}s)"
            record.args = ()
        self._seen.pop(key, None)
        self._seen[key] = _Seen(now)
        while len(self._seen) > _MAX_KINDS:
            del self._seen[next(iter(self._seen))]
        return True
