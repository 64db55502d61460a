"""The KV cache arena (runtime.backend.vllm_kv) with plain torch calls standing in for vLLM's
one ``torch.zeros(n, dtype=torch.int8)``: what is intercepted, what is reused, and when."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.backend.vllm_kv import KvArena

KV = 1 << 20


def test_the_kv_cache_zeros_come_from_the_arena_and_nothing_else_does() -> None:
    arena = KvArena()
    with arena.lending(KV) as lease:
        small = torch.zeros(1024, dtype=torch.int8)  # not the KV cache's size
        floats = torch.zeros(KV - 4096, dtype=torch.float32)
        kv = torch.zeros(KV - 4096, dtype=torch.int8)
        second = torch.zeros(KV - 4096, dtype=torch.int8)  # one lend per build
    assert lease.nbytes == KV - 4096 and not lease.reused
    assert arena.capacity == KV - 4096
    assert kv.numel() == KV - 4096 and not kv.any()
    for t in (small, floats, second):
        assert t.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    assert torch.zeros(8, dtype=torch.int8).sum() == 0  # outside the block: plain torch


def test_a_released_arena_is_lent_again_zeroed_on_the_same_memory() -> None:
    arena = KvArena()
    with arena.lending(KV) as first:
        kv = torch.zeros(KV, dtype=torch.int8)
    kv.fill_(7)  # the engine wrote its keys and values
    address = kv.data_ptr()
    arena.release(first)
    with arena.lending(KV) as again:
        kv2 = torch.zeros(KV - 8192, dtype=torch.int8)
    assert again.reused and again.nbytes == KV - 8192
    assert kv2.data_ptr() == address
    assert not kv2.any()


def _resident(t: torch.Tensor) -> int:
    """Bytes of ``t``'s pages in memory (mincore over its mapping)."""
    import ctypes
    import mmap as _mmap

    page = _mmap.PAGESIZE
    start = t.data_ptr() // page * page
    pages = (t.data_ptr() + t.nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) == 0
    return sum(v & 1 for v in vec) * page


def _served_arena(n: int) -> KvArena:
    """An arena whose first engine took ``n`` fresh bytes (not faulted in by the build: torch.zeros
    would have faulted in every page), used its first blocks and one further on, and was freed."""
    arena = KvArena()
    with arena.lending(n) as first:
        kv = torch.zeros(n, dtype=torch.int8)
    assert first.how == "allocated" and _resident(kv) < KV
    kv[: 2 * KV].fill_(5)
    kv[40 * KV + 5] = 9
    del kv
    arena.release(first)
    return arena


def test_a_reuse_zeroes_only_the_pages_the_last_engine_touched() -> None:
    """Untouched pages are not resident and read as zeros: they are not faulted in to be
    zeroed."""
    arena = _served_arena(64 * KV)
    with arena.lending(64 * KV) as again:
        kv = torch.zeros(64 * KV, dtype=torch.int8)
    assert again.reused
    assert _resident(kv) < 3 * KV
    assert not kv.any()


def test_the_part_a_growth_adds_is_left_to_fault_in() -> None:
    arena = _served_arena(64 * KV)
    with arena.lending(128 * KV) as grown:
        kv = torch.zeros(128 * KV, dtype=torch.int8)
    assert grown.grown
    assert _resident(kv[64 * KV :]) < KV
    assert not kv[: 64 * KV].any()


def test_an_arena_still_lent_is_not_lent_twice() -> None:
    """The engine holding it was not freed (its thread did not stop): the next build
    allocates as vLLM would."""
    arena = KvArena()
    with arena.lending(KV):
        held = torch.zeros(KV, dtype=torch.int8)
    with arena.lending(KV) as lease:
        other = torch.zeros(KV, dtype=torch.int8)
    assert lease.nbytes == 0
    assert other.data_ptr() != held.data_ptr()


def test_a_larger_kv_cache_grows_the_arena_and_the_old_memory_stays_valid() -> None:
    arena = KvArena()
    with arena.lending(KV) as first:
        small = torch.zeros(KV, dtype=torch.int8)
    small.fill_(3)
    arena.release(first)
    with arena.lending(4 * KV) as lease:
        big = torch.zeros(4 * KV, dtype=torch.int8)
    assert not lease.reused and not lease.grown and arena.capacity == 4 * KV
    assert not big.any()
    assert int(small.sum()) == 3 * KV  # the older engine's view still reads its memory


def test_a_larger_kv_cache_extends_the_freed_arena_in_place() -> None:
    """No engine refers to the memory any more: the mapping is extended (mremap), so the
    pages the last engine touched are not faulted in again; all of it comes back zeroed."""
    arena = KvArena()
    with arena.lending(KV) as first:
        small = torch.zeros(KV, dtype=torch.int8)
    small.fill_(3)
    del small
    arena.release(first)
    with arena.lending(4 * KV) as lease:
        big = torch.zeros(4 * KV, dtype=torch.int8)
    assert lease.grown and not lease.reused and lease.timing_key == "kv_cache_grown_s"
    assert arena.capacity == 4 * KV and not big.any()


def test_freeing_the_arena_leaves_a_live_tensor_valid() -> None:
    """``free`` drops the arena's mapping; a tensor that still refers to it (an engine that
    leaked one) keeps the memory mapped: nothing is unmapped under it."""
    arena = KvArena()
    with arena.lending(KV) as lease:
        kv = torch.zeros(KV, dtype=torch.int8)
    kv.fill_(5)
    assert arena.free() == 0  # lent: an engine holds it
    arena.release(lease)
    assert arena.free() == KV and arena.capacity == 0
    assert int(kv.sum()) == 5 * KV


def test_a_failed_build_gives_the_memory_back() -> None:
    arena = KvArena()
    with pytest.raises(RuntimeError), arena.lending(KV):
        torch.zeros(KV, dtype=torch.int8)
        raise RuntimeError("the build failed after allocating its KV cache")
    with arena.lending(KV) as lease:
        torch.zeros(KV, dtype=torch.int8)
    assert lease.reused


def test_only_the_building_thread_is_intercepted() -> None:
    arena = KvArena()
    seen: list[torch.Tensor] = []
    with arena.lending(KV) as lease:
        thread = threading.Thread(target=lambda: seen.append(torch.zeros(KV, dtype=torch.int8)))
        thread.start()
        thread.join()
    assert lease.nbytes == 0 and arena.capacity == 0 and not seen[0].any()


def test_a_build_that_finds_the_arena_lent_does_not_hold_its_lock() -> None:
    """The engine holding the arena is closed on another thread while a build that found it
    lent runs: the release must not wait for that build to end."""
    arena = KvArena()
    with arena.lending(KV) as first:
        torch.zeros(KV, dtype=torch.int8)
    with arena.lending(KV):
        releaser = threading.Thread(target=arena.release, args=(first,))
        releaser.start()
        releaser.join(timeout=5)
        assert not releaser.is_alive()
    with arena.lending(KV) as again:
        torch.zeros(KV, dtype=torch.int8)
    assert again.reused
