"""Recent log lines of each function's instances (from ``sllm.logs.<function>``), kept in a
bounded ring buffer per function for ``GET /system/logs/<name>``."""

from __future__ import annotations

from collections import deque

from sllm.messages import LogLine

# 1000 lines per function: a few screens of a crash, bounded memory (~100 KB per function).
LINES_PER_FUNCTION = 1000


class LogBuffer:
    def __init__(self, capacity: int = LINES_PER_FUNCTION) -> None:
        self._capacity = capacity
        self._lines: dict[str, deque[LogLine]] = {}

    def add(self, line: LogLine) -> None:
        self._lines.setdefault(line.function, deque(maxlen=self._capacity)).append(line)

    def tail(self, function: str, n: int) -> list[dict[str, str]]:
        lines = list(self._lines.get(function, ()))
        return (
            [
                {
                    "instance_id": x.instance_id,
                    "node": x.node_id,
                    "stream": x.stream,
                    "line": x.line,
                }
                for x in lines[-n:]
            ]
            if n > 0
            else []
        )

    def forget(self, function: str) -> None:
        self._lines.pop(function, None)
