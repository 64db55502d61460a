"""The vLLM KV cache allocated once per process (CPU): ``KvArena``.

vLLM allocates its KV cache as one ``torch.zeros(n, dtype=int8)`` per engine build
(``vllm.v1.worker.utils.allocate_kv_cache``). On this 2-core VM that call was most of a
build: SmolLM2 with a 2 GiB budget, 4.8 of a 6.4 s first build (cProfile), because every page
of fresh memory faults and is zeroed one at a time; freeing it again when an engine was
replaced took 0.7 s more. An idle vLLM process builds one engine after another (the node's
prebuild hint, then the load's own model when it is another configuration), so the process
keeps the memory of the first KV cache and lends it to each later build: the mapping stays,
and the same engine rebuild took 1.8-2.4 s instead of 4.8-5.6 s (measured,
``bench/backends.py``'s built cold start).

No page is faulted in by the build. Fresh anonymous memory reads as zeros, so it is left to
fault in as vLLM fills its blocks (a request touches the few it uses). A reuse zeroes only the
pages an earlier engine touched (present or swapped out, by ``/proc/self/pagemap``): a page
never touched is not resident and reads as zeros. Zeroing all of a reused 1.8 GiB took 1.7-2.0 s
when most of it had never been touched (each page faulted in to be zeroed), 0.22 s when all of
it was resident.

The lending is a ``TorchFunctionMode`` around the engine build on the building thread: it
answers the one ``torch.zeros`` of the KV cache's size with a view of the arena, and lets every
other call through. No vLLM code is patched: when a vLLM version allocates differently, the
mode sees no such call and the build allocates as before (slower, still correct);
tests/integration/vllm pins the reuse against the locked vLLM.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


@dataclass
class KvLease:
    """What one engine build got from the arena: ``how`` is ``reused`` (memory an earlier
    engine of this process held, zeroed), ``grown`` (that memory and more: the mapping was
    extended in place) or ``allocated`` (fresh); ``nbytes`` 0 when the build allocated no KV
    cache through the arena (it was lent to another engine, or vLLM never asked)."""

    nbytes: int = 0
    how: str = "allocated"
    seconds: float = 0.0  # mapping it and zeroing what an earlier engine wrote

    @property
    def reused(self) -> bool:
        return self.how == "reused"

    @property
    def grown(self) -> bool:
        return self.how == "grown"

    @property
    def timing_key(self) -> str:
        """The key of ``seconds`` in an instance's load timings."""
        return "kv_cache_s" if self.how == "allocated" else f"kv_cache_{self.how}_s"


class KvArena:
    """One private anonymous mapping that the engines of this process take their KV cache
    from, one engine at a time. ``lending`` wraps a build; ``release`` hands the memory back
    once that engine is stopped and dropped (``VllmBackend.close``). The mapping grows when a
    build asks for more than it holds (the old one is unmapped when nothing refers to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._lent: KvLease | None = None

    @property
    def capacity(self) -> int:
        return len(self._map) if self._map is not None else 0

    @contextmanager
    def lending(self, kv_bytes: int) -> Iterator[KvLease]:
        """Within this block, on this thread, the first ``torch.zeros(n, dtype=torch.int8)``
        on the CPU with ``kv_bytes // 2 < n <= kv_bytes`` (vLLM's KV cache: its budget
        ``kv_bytes`` rounded down to whole blocks) returns the arena's first ``n`` bytes, zeroed.
        When the arena is still lent to a live engine, nothing is intercepted."""
        lease = KvLease()
        with self._lock:
            free = self._lent is None
            if free:
                self._lent = lease
        if not free:
            yield lease
            return
        try:
            with _KvAllocation(self, lease, kv_bytes):
                yield lease
        except BaseException:
            self.release(lease)  # the build failed: no engine runs on the memory
            raise
        if lease.nbytes == 0:  # the build never asked: nothing lent
            self.release(lease)

    def release(self, lease: KvLease) -> None:
        """The engine holding ``lease`` is gone: the next build may take the memory (a lease
        that does not hold it: nothing)."""
        with self._lock:
            if self._lent is lease:
                self._lent = None

    def free(self) -> int:
        """Give the memory back to the system (the node needs it); its size, 0 while an
        engine holds it. The next build allocates afresh."""
        with self._lock:
            if self._lent is not None or self._map is None:
                return 0
            size, self._map = len(self._map), None  # unmapped with its last tensor
        return size

    def _take(self, lease: KvLease, n: int) -> torch.Tensor:
        started = time.monotonic()
        old = len(self._map) if self._map is not None else 0
        if self._map is not None and old >= n:
            lease.how, written = "reused", n  # written: what an earlier engine may have used
        elif self._map is not None and _unshared(self._map) and _extended(self._map, n):
            # a larger KV cache, in place (mremap): the added part is fresh memory
            # (1.1B model after SmolLM2 here: 576 of 2367 MiB)
            lease.how, written = "grown", old
        else:  # the first build, or an older engine's tensor still uses the old mapping (it
            # is unmapped with that tensor)
            self._map = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            written = 0
        view = torch.frombuffer(self._map, dtype=torch.int8, count=n)
        _zero_touched(view[:written])  # the rest is fresh: zeros until it faults in
        lease.nbytes = n
        lease.seconds = time.monotonic() - started
        return view


_PRESENT = -(1 << 63)  # /proc/self/pagemap entry bits (as int64): page in memory
_SWAPPED = 1 << 62  # page swapped out


def _zero_touched(view: torch.Tensor) -> None:
    """Zero the pages of ``view`` (page-aligned, private anonymous memory) that hold anything:
    present or swapped out. A page neither was never touched (or was dropped) and reads as
    zeros when it faults in. Where the page map cannot be read, all of it is zeroed."""
    page = mmap.PAGESIZE
    pages = (view.numel() + page - 1) // page
    if pages == 0:
        return
    raw = b""
    if view.data_ptr() % page == 0:
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY)
            try:
                raw = os.pread(fd, pages * 8, view.data_ptr() // page * 8)
            finally:
                os.close(fd)
        except OSError:
            pass
    if len(raw) != pages * 8:
        view.zero_()
        return
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    held = ((entries & _PRESENT) != 0) | ((entries & _SWAPPED) != 0)
    edges = torch.diff(held.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))  # fmt: skip
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    for first, last in zip(starts, ends, strict=True):  # runs of touched pages
        view[first * page : last * page].zero_()


def _extended(mapping: mmap.mmap, n: int) -> bool:
    try:
        mapping.resize(n)
    except (BufferError, OSError, ValueError, SystemError):
        return False
    return True


def _unshared(mapping: mmap.mmap) -> bool:
    """Whether no tensor refers to ``mapping``. ``torch.frombuffer`` takes no buffer export
    (``mmap.resize`` and ``close`` would go ahead under a live tensor) but its storage holds a
    reference to the mmap object. With no tensor, the references are the arena's attribute,
    this call's argument and getrefcount's own."""
    return sys.getrefcount(mapping) <= 3


class _KvAllocation(TorchFunctionMode):
    """Answers the KV cache's ``torch.zeros`` from the arena (``KvArena.lending``)."""

    def __init__(self, arena: KvArena, lease: KvLease, kv_bytes: int) -> None:
        super().__init__()
        self.arena = arena
        self.lease = lease
        self.kv_bytes = kv_bytes

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        n = _kv_zeros_size(func, args, kwargs)
        if n is not None and self.lease.nbytes == 0 and self.kv_bytes // 2 < n <= self.kv_bytes:
            return self.arena._take(self.lease, n)
        return func(*args, **kwargs)


def _kv_zeros_size(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """``n`` for ``torch.zeros(n, dtype=torch.int8)`` on the CPU (no other keyword), else None."""
    if func is not torch.zeros or kwargs.get("dtype") is not torch.int8:
        return None
    if set(kwargs) - {"dtype", "device"}:
        return None
    if torch.device(kwargs.get("device") or "cpu").type != "cpu":
        return None
    size = args[0] if len(args) == 1 else None
    if isinstance(size, (tuple, list, torch.Size)) and len(size) == 1:
        size = size[0]
    return size if isinstance(size, int) else None


ARENA = KvArena()  # the process's: one vLLM engine serves at a time in an instance process
