"""Repeated identical warnings are rate-limited in the log (issue 14: 13.5k lines in 25 s)."""

from __future__ import annotations

import logging

from sllm_cli.log_repeats import RepeatFilter


def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("gateway.launcher", level, __file__, 1, msg, None, None)


def test_identical_lines_pass_once_per_window_and_then_say_how_many() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=10.0, clock=lambda: now[0])
    passed = []
    for i in range(1000):
        now[0] = i * 0.025  # 25 s of a loop failing every 25 ms
        r = record("no capacity function=chat reason=no node is connected")
        if f.filter(r):
            passed.append(r.getMessage())
    assert len(passed) == 3
    assert passed[1].endswith("(repeated 399 more times in 10s)")
    other = record("load failed function=other")
    assert f.filter(other)  # another message is not held back
    info = record("instance ready", logging.INFO)
    assert f.filter(info) and f.filter(record("instance ready", logging.INFO))
