"""The one checkpoint reader: a checkpoint directory's partitions into an image, at disk speed.

The node's SSD -> DRAM hop (``runtime.cache.tiered``) reads with it straight into the DRAM
entry's shared memory, and ``bench/load.py`` measures it on that same path. Built on
``direct_io``: each chunk whose pages are mostly cold is read with O_DIRECT (16 MiB requests,
4 in flight saturate this machine's disk: DESIGN.md "This machine"); a chunk mostly in the page
cache (``direct_io.Residency``: ``cachestat``, else ``mincore``) is read buffered, since
O_DIRECT would ignore the cache and run ~5x slower; unless the destination is a populated
slab, its pages are populated first (``populate_write``), so a copy into fresh memory does not
fault once per 4 KiB. File systems that refuse O_DIRECT
(tmpfs) and unaligned destinations are read buffered. Each partition's slot in the image is
rounded up to 4096 (``image_layout``), so the rounded-up tail of a direct read stays inside it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from runtime.ckpt.index import CheckpointIndex, check_partition_sizes, image_layout
from runtime.loader.direct_io import (
    DIRECT_ALIGN,
    Residency,
    open_direct,
    populate_write,
    read_into,
)
from sllm.errors import CheckpointError

# 16 MiB reads, 4 in flight: 2-4 reads of 4-16 MiB saturate this machine's disk (DESIGN.md).
CHUNK_BYTES = 16 << 20
THREADS = 4
# Reads served by the page cache are memory copies, run on at most one thread per core: 2 GB
# into a populated slab on 2 threads took 0.176-0.182 s in 16 MiB pieces and 0.177-0.185 s in
# 4 MiB ones here (measured): the same, so a cached chunk is read whole.
# A chunk with at least half its pages cached is read buffered (page cache -> memory at
# ~11 GB/s) instead of O_DIRECT (disk speed, ~1-2 GB/s, whatever is cached).
CACHED_FRACTION = 0.5

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReadStats:
    """What one ``read_checkpoint`` did. Bandwidth counts checkpoint bytes, not padding."""

    bytes: int
    seconds: float
    direct_bytes: int
    buffered_bytes: int
    chunks: int
    threads: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Job:
    partition: int
    offset: int  # in the partition file
    length: int
    at: int  # in the image
    direct: bool


def read_checkpoint(
    directory: Path,
    index: CheckpointIndex,
    dest: memoryview,
    *,
    threads: int = THREADS,
    executor: ThreadPoolExecutor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    direct: bool | None = None,
    populated: int = 0,
) -> ReadStats:
    """Fill ``dest`` (a writable byte view of an image, ``image_layout(index)`` sized) with
    every partition of ``directory``.

    ``direct``: None decides per chunk from page-cache residency; True/False forces O_DIRECT
    (where the file system allows it) or buffered reads. ``populated``: bytes from the start
    of ``dest`` whose page tables are already populated (a node's reused slab): buffered
    reads there skip ``populate_write``, whose walk over populated pages alone cost 25-90 ms
    per 2 GB here (measured). ``executor``: long-lived reader
    threads (a node's; ``threads`` new ones otherwise); at most ``threads`` reads are in flight
    either way, and at most one per core when every chunk is cached. Raises
    ``CheckpointError`` for a missing or truncated partition; on any error no read is still
    writing into ``dest`` when this returns.
    """
    directory = Path(directory)
    starts, size = image_layout(index)
    if len(dest) < size:
        raise CheckpointError(f"{directory}: image holds {len(dest)} bytes, needs {size}")
    if dest.readonly:
        raise CheckpointError(f"{directory}: image is read-only, cannot read into it")
    check_partition_sizes(directory, index)
    base = _address(dest) if size else 0
    aligned = size == 0 or base % DIRECT_ALIGN == 0
    fds: list[tuple[int, int | None]] = []
    jobs: list[_Job] = []
    began = time.perf_counter()
    try:
        for i, p in enumerate(index.partitions):
            path = str(directory / p.file)
            fd = os.open(path, os.O_RDONLY)
            fd_direct = open_direct(path) if aligned and direct is not False else None
            fds.append((fd, fd_direct))
            residency = Residency(fd, p.nbytes)
            for off in range(0, p.nbytes, chunk_bytes):
                length = min(chunk_bytes, p.nbytes - off)
                cached = (
                    fd_direct is not None
                    and direct is None
                    and residency.fraction(off, length) >= CACHED_FRACTION
                )
                direct_chunk = fd_direct is not None and not cached
                jobs.append(_Job(i, off, length, starts[i] + off, direct_chunk))

        def run(job: _Job) -> tuple[int, bool]:
            fd, fd_direct = fds[job.partition]
            if not job.direct and job.at + job.length > populated:
                # A buffered read into pages not mapped yet faults once per 4 KiB inside the
                # copy; one populate call first costs less (2 GB warm into fresh shared
                # memory: ~0.7-1.0 s against 1.3-2.2 s, measured).
                skip = max(0, populated - job.at)
                populate_write(base + job.at + skip, job.length - skip)
            try:
                was_direct = read_into(
                    fd, fd_direct if job.direct else None, dest[job.at :], job.offset, job.length
                )
            except EOFError as exc:
                raise CheckpointError(
                    f"{directory / index.partitions[job.partition].file}: {exc} (truncated?)"
                ) from None
            return job.length, was_direct

        # Direct reads wait on the disk (more in flight helps); buffered ones are CPU copies
        # (more threads than cores only adds contention).
        any_direct = any(job.direct for job in jobs)
        cap = threads if any_direct else min(threads, os.cpu_count() or 1)
        workers = max(1, min(cap, len(jobs)))
        results = bounded_map(run, jobs, workers, executor, "sllm-read")
    finally:
        for fd, fd_direct in fds:
            os.close(fd)
            if fd_direct is not None:
                os.close(fd_direct)
    seconds = time.perf_counter() - began
    direct_bytes = sum(n for n, d in results if d)
    total = sum(n for n, _ in results)
    return ReadStats(total, seconds, direct_bytes, total - direct_bytes, len(jobs), workers)


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    in_flight: int,
    executor: ThreadPoolExecutor | None,
    name: str,
) -> list[R]:
    """``fn`` over ``items`` with at most ``in_flight`` calls running, results in order.

    Each of ``in_flight`` workers takes the next item as soon as its last call returns: a
    caller handing out items one by one, in order, left a worker idle whenever a later call
    finished before an earlier one (~15-20% of a warm 2 GB read here, measured). On the first
    error no further call starts, and the running ones are waited for before it is raised:
    nothing keeps writing into the caller's buffers after this returns."""
    if executor is None:
        with ThreadPoolExecutor(max(1, in_flight), thread_name_prefix=name) as own:
            return bounded_map(fn, items, in_flight, own, name)
    todo = list(items)
    results: list[R | None] = [None] * len(todo)
    taken = 0
    lock = threading.Lock()
    failed = threading.Event()
    errors: list[tuple[int, BaseException]] = []

    def worker() -> None:
        nonlocal taken
        while not failed.is_set():
            with lock:
                i, taken = taken, taken + 1
            if i >= len(todo):
                return
            try:
                results[i] = fn(todo[i])
            except BaseException as exc:
                errors.append((i, exc))
                failed.set()
                return

    workers = [executor.submit(worker) for _ in range(max(1, min(in_flight, len(todo))))]
    try:
        wait(workers)
    except BaseException:
        failed.set()
        wait(workers)
        raise
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return cast(list[R], results)


def _address(view: memoryview) -> int:
    """The address of a writable buffer's first byte (for the O_DIRECT alignment check)."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor
