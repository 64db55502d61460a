"""Load an sllm checkpoint into CPU memory: one aligned image, a few large parallel reads,
tensors as zero-copy views.

The image layout is ``runtime.ckpt.index.image_layout`` (partitions back to back at aligned
offsets), shared with the DRAM cache, so ``tensor_views`` works on any image: one this module
read, or a read-only mapping of a cache file (``image_from_buffer``).
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.ckpt.dtypes import torch_dtype
from runtime.ckpt.index import (
    CheckpointIndex,
    check_partition_sizes,
    checksum_bytes,
    image_layout,
    read_index,
)
from runtime.loader.direct_io import (
    DIRECT_ALIGN,
    open_direct,
    page_residency,
    read_into,
    resident_fraction,
)
from sllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# 16 MiB reads, 4 in flight: 2-4 reads of 4-16 MiB saturate this machine's disk (DESIGN.md).
CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = 4
# Reads served by the page cache are memory copies: 4 MiB pieces (cache-friendly) on at most
# one thread per core ran at ~5 GB/s here, against ~2 GB/s for 16 MiB on 4 threads.
CACHED_CHUNK_BYTES = 4 << 20
# A chunk with at least half its pages cached is read buffered (page cache -> memory at
# ~7-9 GB/s) instead of O_DIRECT (disk speed, ~1-2 GB/s, whatever is cached).
CACHED_FRACTION = 0.5
# Linux 5.14+: fault the pages in from the kernel in one call (much cheaper than touching).
_MADV_POPULATE_WRITE = 23


@dataclass(frozen=True)
class ReadStats:
    """What one ``read_image`` did. Bandwidth counts checkpoint bytes, not padding."""

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
class LoadedCheckpoint:
    index: CheckpointIndex
    image: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: ReadStats


def allocate_image(nbytes: int, *, touch: bool = True) -> torch.Tensor:
    """A writable uint8 tensor of ``nbytes`` on its own page-aligned anonymous mapping.

    ``touch`` pre-faults every page (MADV_POPULATE_WRITE): freshly mapped memory is slow to
    touch the first time on this VM (0.5-3.5 GB/s), so a buffer pool pays that once at start-up
    instead of during a load. The mapping is freed when the tensor is.
    """
    import torch

    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if touch:
        try:
            region.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            # Older kernels: touch one byte per page instead.
            for pos in range(0, nbytes, mmap.PAGESIZE):
                region[pos] = 0
    # frombuffer keeps a reference to ``region``: the mapping lives as long as the tensor.
    return torch.frombuffer(region, dtype=torch.uint8)


def image_from_buffer(buffer: Any) -> torch.Tensor:
    """A uint8 tensor over ``buffer`` (e.g. a read-only ``mmap`` of a shared-memory file),
    without copying. Read-only buffers are accepted silently: torch warns that writing to one
    is undefined, but images are never written once loaded."""
    import torch

    if len(memoryview(buffer)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=torch.uint8)


def image_size(index: CheckpointIndex) -> int:
    return image_layout(index)[1]


def read_image(
    directory: Path,
    index: CheckpointIndex,
    image: torch.Tensor,
    *,
    threads: int = DEFAULT_THREADS,
) -> ReadStats:
    """Read every partition of ``directory`` into ``image`` (layout: ``image_layout``).

    Chunks of ``CHUNK_BYTES`` are read by ``threads`` threads; each is O_DIRECT unless its
    pages are mostly cached, the file system refuses O_DIRECT, or ``image`` is not aligned.
    """
    directory = Path(directory)
    starts, size = image_layout(index)
    if image.numel() < size:
        raise CheckpointError(f"{directory}: image holds {image.numel()} bytes, needs {size}")
    check_partition_sizes(directory, index)
    dest = _writable_view(image, directory)
    aligned = image.data_ptr() % DIRECT_ALIGN == 0
    fds: list[tuple[int, int | None]] = []
    jobs: list[tuple[int, int, int, int, bool]] = []  # (partition, offset, length, at, direct)
    began = time.perf_counter()
    try:
        for i, p in enumerate(index.partitions):
            path = str(directory / p.file)
            fd = os.open(path, os.O_RDONLY)
            fd_direct = open_direct(path) if aligned else None
            fds.append((fd, fd_direct))
            residency = page_residency(fd, p.nbytes) if fd_direct is not None else None
            for off in range(0, p.nbytes, CHUNK_BYTES):
                length = min(CHUNK_BYTES, p.nbytes - off)
                cached = resident_fraction(residency, off, length) >= CACHED_FRACTION
                if fd_direct is not None and not cached:
                    jobs.append((i, off, length, starts[i] + off, True))
                    continue
                for sub in range(off, off + length, CACHED_CHUNK_BYTES):
                    sub_len = min(CACHED_CHUNK_BYTES, off + length - sub)
                    jobs.append((i, sub, sub_len, starts[i] + sub, False))

        def run(job: tuple[int, int, int, int, bool]) -> tuple[int, bool]:
            part, off, length, at, direct = job
            fd, fd_direct = fds[part]
            try:
                was_direct = read_into(fd, fd_direct if direct else None, dest[at:], off, length)
            except EOFError as exc:
                raise CheckpointError(
                    f"{directory / index.partitions[part].file}: {exc} (truncated?)"
                ) from None
            return length, was_direct

        # Direct reads wait on the disk (more in flight helps); buffered ones are CPU copies
        # (more threads than cores only adds contention).
        any_direct = any(job[4] for job in jobs)
        cap = threads if any_direct else min(threads, os.cpu_count() or 1)
        workers = max(1, min(cap, len(jobs)))
        with ThreadPoolExecutor(workers, thread_name_prefix="sllm-read") as pool:
            results = list(pool.map(run, jobs))
    finally:
        for fd, fd_direct in fds:
            os.close(fd)
            if fd_direct is not None:
                os.close(fd_direct)
    seconds = time.perf_counter() - began
    direct = sum(n for n, d in results if d)
    total = sum(n for n, _ in results)
    return ReadStats(total, seconds, direct, total - direct, len(jobs), workers)


def _writable_view(image: torch.Tensor, directory: Path) -> memoryview:
    import torch

    if image.dtype != torch.uint8 or image.dim() != 1 or not image.is_contiguous():
        raise CheckpointError(f"{directory}: image must be a contiguous 1-d uint8 tensor")
    view = memoryview(image.numpy().data)
    if view.readonly:
        raise CheckpointError(f"{directory}: image is read-only, cannot read into it")
    return view.cast("B")


def tensor_views(index: CheckpointIndex, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor (aliases included) as a zero-copy view of ``image``.

    Works on read-only buffer-backed images too: slicing and reinterpreting never copy or warn.
    """
    starts, size = image_layout(index)
    if image.numel() < size:
        raise CheckpointError(f"image holds {image.numel()} bytes, the checkpoint needs {size}")
    views: dict[str, torch.Tensor] = {}
    for name, t in index.tensors.items():
        begin = starts[t.partition] + t.offset
        raw = image[begin : begin + t.nbytes]
        views[name] = raw.view(torch_dtype(t.dtype)).view(t.shape)
    for alias, target in index.aliases.items():
        views[alias] = views[target]
    return views


def verify_image(index: CheckpointIndex, image: torch.Tensor) -> None:
    """Check each partition's bytes in ``image`` against its checksum (CheckpointError)."""
    starts, _ = image_layout(index)
    data = memoryview(image.numpy().data).cast("B")
    for start, p in zip(starts, index.partitions, strict=True):
        if checksum_bytes(data[start : start + p.nbytes]) != p.checksum:
            raise CheckpointError(f"{p.file}: checksum mismatch in the loaded image (corrupt)")


def load_checkpoint(
    directory: Path,
    *,
    threads: int = DEFAULT_THREADS,
    image: torch.Tensor | None = None,
) -> LoadedCheckpoint:
    """Read index, allocate (or reuse ``image``, e.g. from a pre-touched pool), read, view.

    A fresh image is not pre-touched: its pages are faulted in by the reads themselves, on
    the reading threads and overlapped with the disk (cold 2 GB here: ~1.0 GB/s this way
    against ~0.6 GB/s populating first). A pre-touched pool image is faster still (~1.3 GB/s).
    """
    directory = Path(directory)
    index = read_index(directory)
    if image is None:
        image = allocate_image(image_size(index), touch=False)
    stats = read_image(directory, index, image, threads=threads)
    return LoadedCheckpoint(index, image, tensor_views(index, image), stats)
