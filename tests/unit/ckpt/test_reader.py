"""The one reader (``runtime.loader.read``): residency, both read modes, a node's executor,
and no read left writing into the destination after an error."""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.ckpt.index import image_layout
from runtime.loader.direct_io import (
    Residency,
    page_residency,
    populate_write,
    resident_fraction,
)
from runtime.loader.read import bounded_map, read_checkpoint
from sllm.errors import CheckpointError
from tests.synthetic_checkpoint import write_random_checkpoint


def _residency(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        return resident_fraction(page_residency(fd, path.stat().st_size), 0, path.stat().st_size)
    finally:
        os.close(fd)


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    assert _residency(path) > 0.9  # just written: in the page cache
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert _residency(path) < 0.5


@pytest.mark.parametrize("cachestat", [True, False])
def test_residency_of_a_range_follows_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cachestat: bool
) -> None:
    """The reader's per-chunk question: cachestat where the kernel has it, else mincore."""
    import runtime.loader.direct_io as direct_io

    if not cachestat:
        monkeypatch.setattr(direct_io, "_cachestat_missing", True)
    elif direct_io.cached_pages(0, 0, 1) is None and direct_io._cachestat_missing:
        pytest.skip("this kernel has no cachestat (Linux < 6.5)")
    path = tmp_path / "f.bin"
    half = 2 << 20
    path.write_bytes(os.urandom(2 * half + 100))  # a partial last page
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, half, 0, os.POSIX_FADV_DONTNEED)  # the second half leaves
        residency = Residency(fd, 2 * half + 100)
        assert residency.fraction(0, half) == 1.0
        assert residency.fraction(half, half + 100) < 0.5
        os.pread(fd, 100, 2 * half)  # the partial last page comes back
        residency = Residency(fd, 2 * half + 100)  # (mincore's answer is one per file)
        assert residency.fraction(2 * half, 1 << 20) == 1.0  # past the end: not counted
        assert residency.fraction(2 * half + 100, 4096) == 0.0  # nothing there
    finally:
        os.close(fd)


def _faults_writing_every_page(mm: mmap.mmap) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for off in range(0, len(mm), mmap.PAGESIZE):
        mm[off] = 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_populate_write_maps_pages_before_the_writes(tmp_path: Path) -> None:
    """The reader populates a buffered read's destination first (one call instead of a page
    fault per 4 KiB inside the copy); an unaligned start is widened to whole pages."""
    size = 4 << 20
    pages = size // mmap.PAGESIZE
    faults = {}
    for populate in (False, True):
        fd = os.open(tmp_path / f"slab-{populate}", os.O_RDWR | os.O_CREAT, 0o600)
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
        os.close(fd)
        if populate:
            anchor = ctypes.c_char.from_buffer(mm)
            assert populate_write(ctypes.addressof(anchor) + 100, size - 100)
            del anchor
        faults[populate] = _faults_writing_every_page(mm)
        mm.close()
    assert faults[False] > pages * 0.9, faults  # each page faulted in by its write
    assert faults[True] < pages // 4, faults


@pytest.mark.parametrize("direct", [True, False, None])
@pytest.mark.parametrize("shared", [False, True])
def test_reader_fills_the_image(tmp_path: Path, direct: bool | None, shared: bool) -> None:
    # Odd sizes: the last chunk of each partition is not 4096-aligned.
    index = write_random_checkpoint(tmp_path, (3 * (1 << 20) + 77, 5000))
    starts, size = image_layout(index)
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    executor = ThreadPoolExecutor(4) if shared else None
    try:
        stats = read_checkpoint(
            tmp_path, index, view, chunk_bytes=1 << 20, direct=direct, executor=executor
        )
    finally:
        if executor is not None:
            executor.shutdown()
    assert stats.bytes == index.total_bytes
    if direct is False:
        assert stats.direct_bytes == 0
    for start, p in zip(starts, index.partitions, strict=True):
        assert view[start : start + p.nbytes] == (tmp_path / p.file).read_bytes()
    view.release()
    buf.close()


def test_reader_refuses_a_small_or_read_only_image(tmp_path: Path) -> None:
    index = write_random_checkpoint(tmp_path, (8192,))
    with pytest.raises(CheckpointError, match="image holds 4096 bytes, needs 8192"):
        read_checkpoint(tmp_path, index, memoryview(bytearray(4096)))
    with pytest.raises(CheckpointError, match="read-only"):
        read_checkpoint(tmp_path, index, memoryview(bytes(8192)))


def test_an_error_waits_for_the_reads_in_flight() -> None:
    """The first error is raised only after the calls already running have returned, and no
    call starts after it (callers free the destination right after an error)."""
    running = threading.Event()
    finished: list[int] = []

    def work(i: int) -> int:
        if i == 0:
            running.set()
            time.sleep(0.3)
            finished.append(i)
            return i
        running.wait()
        if i == 1:
            raise OSError("disk gone")
        finished.append(i)
        return i

    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="disk gone"):
        bounded_map(work, range(50), 2, pool, "t")
    assert 0 in finished  # the slow read was waited for
    assert len(finished) <= 3  # the rest was cancelled, not run


def test_a_slow_call_does_not_hold_back_the_next_items() -> None:
    """A worker takes the next item as soon as its call returns: while item 0 is slow, the
    other worker goes through the rest (a caller waiting on results in order left it idle)."""
    last_ran = threading.Event()

    def work(i: int) -> int:
        if i == 0:
            assert last_ran.wait(10), "items behind the slow one waited for it"
        if i == 9:
            last_ran.set()
        return i * i

    with ThreadPoolExecutor(2) as pool:
        assert bounded_map(work, range(10), 2, pool, "t") == [i * i for i in range(10)]


def test_populated_destination_pages_are_not_populated_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffered read populates only the destination pages past ``populated`` (a reused
    slab's are mapped already; walking them again cost 25-90 ms per 2 GB)."""
    import runtime.loader.read as read

    index = write_random_checkpoint(tmp_path, (4 << 20,))
    calls: list[tuple[int, int]] = []
    buf = mmap.mmap(-1, image_layout(index)[1])
    view = memoryview(buf)
    anchor = ctypes.c_char.from_buffer(buf)
    base = ctypes.addressof(anchor)
    monkeypatch.setattr(read, "populate_write", lambda a, n: calls.append((a - base, n)))
    try:
        read_checkpoint(
            tmp_path, index, view, chunk_bytes=1 << 20, direct=False, populated=(2 << 20) + 4096
        )
        assert view[: 4 << 20] == (tmp_path / index.partitions[0].file).read_bytes()
    finally:
        del anchor
        view.release()
        buf.close()
    assert sorted(calls) == [((2 << 20) + 4096, (1 << 20) - 4096), (3 << 20, 1 << 20)]
