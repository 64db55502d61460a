"""Eviction decisions as tables: contents + need -> victims (or CacheFull)."""

from __future__ import annotations

import pytest

from runtime.cache.policy import CacheEntry, choose_victims
from sllm.errors import CacheFull

E = CacheEntry


@pytest.mark.parametrize(
    ("entries", "need", "capacity", "victims"),
    [
        ([], 10, 10, []),
        ([E("a", 4, 1)], 6, 10, []),
        # LRU first, and only as many as needed.
        ([E("a", 4, 3), E("b", 4, 1), E("c", 2, 2)], 4, 10, ["b"]),
        ([E("a", 4, 3), E("b", 4, 1), E("c", 2, 2)], 6, 10, ["b", "c"]),
        ([E("a", 4, 3), E("b", 4, 1), E("c", 2, 2)], 10, 10, ["b", "c", "a"]),
        # In-use entries are skipped even when they are the oldest.
        ([E("a", 4, 1, in_use=True), E("b", 4, 2), E("c", 2, 3)], 4, 10, ["b"]),
        ([E("a", 4, 1, in_use=True), E("b", 4, 2), E("c", 2, 3)], 6, 10, ["b", "c"]),
        # Over capacity already (capacity shrank): need 0 evicts down to capacity.
        ([E("a", 8, 1), E("b", 8, 2)], 0, 10, ["a"]),
    ],
)
def test_victims(entries: list[CacheEntry], need: int, capacity: int, victims: list[str]) -> None:
    assert choose_victims(entries, need, capacity) == victims


@pytest.mark.parametrize(
    ("entries", "need", "capacity", "message"),
    [
        ([], 11, 10, "capacity is 10"),
        ([E("a", 6, 1, in_use=True)], 5, 10, "6 bytes in use"),
        ([E("a", 3, 1, in_use=True), E("b", 3, 2, in_use=True), E("c", 2, 0)], 5, 10, "6 bytes"),
    ],
)
def test_cannot_fit(entries: list[CacheEntry], need: int, capacity: int, message: str) -> None:
    with pytest.raises(CacheFull, match=message):
        choose_victims(entries, need, capacity)


def test_negative_need_is_a_bug() -> None:
    with pytest.raises(ValueError, match="need_bytes"):
        choose_victims([], -1, 10)
