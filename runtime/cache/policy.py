"""Cache eviction as a pure function (STYLE.md 1): contents and a need in, victims out.

No clock, no disk: ``last_used`` is whatever monotonically increasing stamp the tier keeps
(a use counter), so tests are tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sllm.errors import CacheFull


@dataclass(frozen=True)
class CacheEntry:
    """One entry of a tier. ``in_use``: pinned (an instance or a pull reads it)."""

    key: str
    nbytes: int
    last_used: int
    in_use: bool = False


def choose_victims(entries: Sequence[CacheEntry], need_bytes: int, capacity: int) -> list[str]:
    """The least recently used entries not in use whose removal makes ``need_bytes`` fit.

    ``entries`` are everything the tier holds or has reserved (reservations are in use).
    Returns keys in eviction order (oldest first), evicting no more than needed. Raises
    ``CacheFull`` when even evicting every unused entry cannot make room; the message says
    how much is pinned.
    """
    if need_bytes < 0:
        raise ValueError(f"need_bytes must be >= 0, got {need_bytes}")
    if need_bytes > capacity:
        raise CacheFull(f"needs {need_bytes} bytes but the tier's capacity is {capacity} bytes")
    used = sum(e.nbytes for e in entries)
    free = capacity - used
    if need_bytes <= free:
        return []
    victims: list[str] = []
    for entry in sorted((e for e in entries if not e.in_use), key=lambda e: e.last_used):
        victims.append(entry.key)
        free += entry.nbytes
        if need_bytes <= free:
            return victims
    pinned = sum(e.nbytes for e in entries if e.in_use)
    raise CacheFull(
        f"needs {need_bytes} bytes; capacity {capacity} bytes, {pinned} bytes in use by "
        "running instances or pulls cannot be evicted"
    )
