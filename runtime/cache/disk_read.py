"""Read a checkpoint directory's partitions into an image buffer at disk speed.

Cold files are read with O_DIRECT (no page-cache copy; 16 MiB requests, 4 in flight saturate
the disk here: DESIGN.md "This machine"); files already in the page cache (``mincore``) are
read buffered, because O_DIRECT would ignore the cache and run ~5x slower. Buffers and offsets
are 4096-aligned by the image layout, so O_DIRECT's alignment rules hold; each partition's
slot in the image is rounded up to 4096, so reading the rounded-up tail stays inside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime.ckpt.index import CheckpointIndex, align_up, image_layout
from sllm.errors import CheckpointError

CHUNK_BYTES = 16 << 20
CONCURRENCY = 4
# A file counts as cached (read buffered) when at least this share of its pages is resident.
CACHED_SHARE = 0.5
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore); 0.0 if it cannot be told."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    pages = (size + _PAGE - 1) // _PAGE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == _MAP_FAILED:
        return 0.0
    try:
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            return 0.0
        # Bit 0 of each byte: page resident; the other bits are reserved (zero).
        return (pages - bytes(vec).count(0)) / pages
    finally:
        _libc.munmap(addr, size)


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass  # tmpfs and some filesystems refuse O_DIRECT: read buffered
    return os.open(path, os.O_RDONLY), False


def read_partitions(
    directory: Path,
    index: CheckpointIndex,
    buffer: memoryview,
    concurrency: int = CONCURRENCY,
    chunk_bytes: int = CHUNK_BYTES,
    direct: bool | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    """Fill ``buffer`` (an image, ``image_layout(index)`` sized, page-aligned) from the
    partition files in ``directory``. ``direct``: None decides per file from residency.
    ``executor``: long-lived reader threads (``concurrency`` of them are started otherwise)."""
    starts, size = image_layout(index)
    if len(buffer) < size:
        raise ValueError(f"buffer of {len(buffer)} bytes is smaller than the image ({size})")
    fds: list[tuple[int, bool]] = []
    try:
        for p in index.partitions:
            path = Path(directory) / p.file
            use_direct = resident_fraction(path) < CACHED_SHARE if direct is None else direct
            fds.append(_open(path, use_direct))
        jobs = [
            (i, off)
            for i, p in enumerate(index.partitions)
            for off in range(0, p.nbytes, chunk_bytes)
        ]

        def read(job: tuple[int, int]) -> None:
            i, off = job
            nbytes = index.partitions[i].nbytes
            fd, is_direct = fds[i]
            want = min(chunk_bytes, nbytes - off)
            length = align_up(want) if is_direct else want
            piece = buffer[starts[i] + off : starts[i] + off + length]
            try:
                pos = 0
                while pos < want:
                    n = os.preadv(fd, [piece[pos:]], off + pos)
                    if n == 0:
                        raise CheckpointError(
                            f"{Path(directory) / index.partitions[i].file}: ends at byte "
                            f"{off + pos}, the index says {nbytes}"
                        )
                    pos += n
            finally:
                piece.release()

        if executor is not None:
            for _ in executor.map(read, jobs):
                pass
        else:
            with ThreadPoolExecutor(concurrency, thread_name_prefix="disk-read") as pool:
                for _ in pool.map(read, jobs):
                    pass
    finally:
        for fd, _direct in fds:
            os.close(fd)
