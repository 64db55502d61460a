"""Load a checkpoint onto a CUDA device: pinned staging buffers, chunked asynchronous
host-to-device copies overlapped with the reads of the next chunks.

Two sources: a checkpoint directory (chunks read, O_DIRECT where possible, into a ring of
pinned staging buffers, each copied to the device on a side stream while later chunks are
read) and an in-memory image such as the DRAM cache's (copied directly when it is pinned or
registered, through the staging ring otherwise). The pipeline (``stage_chunks``) is written
against a small ``Sink`` port so its ordering and buffer reuse are tested on CPU too; the CUDA
sink is the only part that needs a GPU (tests/gpu).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runtime.ckpt.index import CheckpointIndex, check_partition_sizes, image_layout, read_index
from runtime.loader.cpu import ReadStats, tensor_views
from runtime.loader.direct_io import (
    DIRECT_ALIGN,
    open_direct,
    page_residency,
    read_into,
    resident_fraction,
)
from sllm.errors import CheckpointError, Unavailable

if TYPE_CHECKING:
    import torch

# 32 MiB chunks, 4 staging buffers: H2D copies of >= 8 MiB run at full PCIe speed, and four
# buffers keep 2-4 reads in flight (what saturates an NVMe or this VM's disk) while one copies.
CHUNK_BYTES = 32 << 20
STAGING_BUFFERS = 4
CACHED_FRACTION = 0.5


class Sink(Protocol):
    """Where staged chunks go: ``copy`` starts a copy of ``src`` into the destination at
    ``at`` and returns a handle; ``wait`` blocks until that copy no longer reads ``src``."""

    def copy(self, at: int, src: torch.Tensor) -> Any: ...

    def wait(self, handle: Any) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class Chunk:
    at: int  # destination offset in the image
    length: int
    fill: Callable[[torch.Tensor], bool]  # fills staging[:length]; True if read O_DIRECT


@dataclass(frozen=True)
class DeviceCheckpoint:
    index: CheckpointIndex
    image: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: ReadStats


def stage_chunks(
    chunks: Iterable[Chunk], staging: list[torch.Tensor], sink: Sink, *, threads: int
) -> tuple[int, int]:
    """Fill staging buffers in parallel and hand each to ``sink`` in order; a buffer is
    refilled only after the copy out of it finished. Returns (bytes, direct bytes)."""
    free: deque[int] = deque(range(len(staging)))
    handles: list[Any] = [None] * len(staging)
    inflight: deque[tuple[Future[bool], int, Chunk]] = deque()
    total = direct = 0

    def drain_one() -> None:
        nonlocal total, direct
        future, k, chunk = inflight.popleft()
        if future.result():
            direct += chunk.length
        total += chunk.length
        handles[k] = sink.copy(chunk.at, staging[k][: chunk.length])
        free.append(k)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sllm-stage") as pool:
        for chunk in chunks:
            if chunk.length > staging[0].numel():
                raise ValueError(f"chunk of {chunk.length} bytes exceeds the staging buffers")
            if not free:
                drain_one()
            k = free.popleft()
            if handles[k] is not None:
                sink.wait(handles[k])
            inflight.append((pool.submit(chunk.fill, staging[k]), k, chunk))
        while inflight:
            drain_one()
    sink.finish()
    return total, direct


class CudaSink:
    """Asynchronous H2D copies on a side stream, one event per copy."""

    def __init__(self, dest: torch.Tensor) -> None:
        import torch

        self.dest = dest
        self.stream = torch.cuda.Stream(device=dest.device)  # type: ignore[no-untyped-call]

    def copy(self, at: int, src: torch.Tensor) -> Any:
        import torch

        with torch.cuda.stream(self.stream):
            self.dest[at : at + src.numel()].copy_(src, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return event

    def wait(self, handle: Any) -> None:
        handle.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


def file_chunks(
    directory: Path, index: CheckpointIndex, chunk_bytes: int, *, aligned: bool
) -> tuple[list[Chunk], Callable[[], None]]:
    """Chunks reading every partition of ``directory`` (O_DIRECT unless mostly cached or
    ``aligned`` is False), and a function closing the files."""
    starts, _ = image_layout(index)
    check_partition_sizes(directory, index)
    fds: list[int] = []
    chunks: list[Chunk] = []

    def close() -> None:
        for fd in fds:
            os.close(fd)

    try:
        for i, p in enumerate(index.partitions):
            path = str(directory / p.file)
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            fd_direct = open_direct(path) if aligned else None
            if fd_direct is not None:
                fds.append(fd_direct)
            residency = page_residency(fd, p.nbytes) if fd_direct is not None else None
            for off in range(0, p.nbytes, chunk_bytes):
                length = min(chunk_bytes, p.nbytes - off)
                cached = resident_fraction(residency, off, length) >= CACHED_FRACTION
                chunks.append(
                    Chunk(
                        starts[i] + off,
                        length,
                        _reader(fd, None if cached else fd_direct, off, length, path),
                    )
                )
    except BaseException:
        close()
        raise
    return chunks, close


def _reader(
    fd: int, fd_direct: int | None, off: int, length: int, path: str
) -> Callable[[torch.Tensor], bool]:
    def fill(buf: torch.Tensor) -> bool:
        try:
            return read_into(fd, fd_direct, memoryview(buf.numpy().data), off, length)
        except EOFError as exc:
            raise CheckpointError(f"{path}: {exc} (truncated?)") from None

    return fill


def image_chunks(host_image: torch.Tensor, size: int, chunk_bytes: int) -> list[Chunk]:
    """Chunks copying an unpinned in-memory image through the staging ring (memcpy)."""

    def copier(at: int, length: int) -> Callable[[torch.Tensor], bool]:
        def fill(buf: torch.Tensor) -> bool:
            buf[:length].copy_(host_image[at : at + length])
            return False

        return fill

    return [
        Chunk(at, min(chunk_bytes, size - at), copier(at, min(chunk_bytes, size - at)))
        for at in range(0, size, chunk_bytes)
    ]


def _require_cuda(device: str) -> torch.device:
    import torch

    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        raise Unavailable(f"device {device!r}: CUDA is not available on this machine")
    return target


def allocate_staging(count: int, nbytes: int, pin: bool = True) -> list[torch.Tensor]:
    import torch

    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]


def load_to_cuda(
    directory: Path,
    *,
    device: str = "cuda",
    chunk_bytes: int = CHUNK_BYTES,
    buffers: int = STAGING_BUFFERS,
    threads: int = STAGING_BUFFERS,
) -> DeviceCheckpoint:
    """Read a checkpoint directory straight onto ``device`` (no full host copy)."""
    import torch

    target = _require_cuda(device)
    directory = Path(directory)
    index = read_index(directory)
    size = image_layout(index)[1]
    image = torch.empty(size, dtype=torch.uint8, device=target)
    staging = allocate_staging(buffers, chunk_bytes)
    aligned = all(b.data_ptr() % DIRECT_ALIGN == 0 for b in staging)
    began = time.perf_counter()
    chunks, close = file_chunks(directory, index, chunk_bytes, aligned=aligned)
    try:
        total, direct = stage_chunks(chunks, staging, CudaSink(image), threads=threads)
    finally:
        close()
    stats = ReadStats(
        total, time.perf_counter() - began, direct, total - direct, len(chunks), threads
    )
    return DeviceCheckpoint(index, image, tensor_views(index, image), stats)


def image_to_cuda(
    index: CheckpointIndex,
    host_image: torch.Tensor,
    *,
    device: str = "cuda",
    chunk_bytes: int = CHUNK_BYTES,
    buffers: int = STAGING_BUFFERS,
) -> DeviceCheckpoint:
    """Copy an in-memory image (e.g. the DRAM cache's mapping) onto ``device``. A pinned or
    registered image is copied directly in chunks; otherwise through pinned staging buffers,
    so the memcpy of one chunk overlaps the DMA of the previous."""
    import torch

    target = _require_cuda(device)
    size = image_layout(index)[1]
    if host_image.numel() < size:
        raise CheckpointError(
            f"image holds {host_image.numel()} bytes, the checkpoint needs {size}"
        )
    image = torch.empty(size, dtype=torch.uint8, device=target)
    sink = CudaSink(image)
    began = time.perf_counter()
    if host_image.is_pinned():
        for at in range(0, size, chunk_bytes):
            sink.copy(at, host_image[at : min(size, at + chunk_bytes)])
        sink.finish()
        chunks = (size + chunk_bytes - 1) // chunk_bytes
    else:
        staging = allocate_staging(buffers, chunk_bytes)
        chunk_list = image_chunks(host_image, size, chunk_bytes)
        stage_chunks(chunk_list, staging, sink, threads=2)
        chunks = len(chunk_list)
    stats = ReadStats(size, time.perf_counter() - began, 0, size, chunks, 1)
    return DeviceCheckpoint(index, image, tensor_views(index, image), stats)


def pin_image(image: torch.Tensor) -> bool:
    """Register ``image``'s memory with CUDA as pinned (cudaHostRegister) so H2D copies from
    it run at full speed; False when CUDA is absent or refuses (e.g. a read-only mapping)."""
    import torch

    if not torch.cuda.is_available() or image.numel() == 0:
        return False
    cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    rc = cudart.cudaHostRegister(image.data_ptr(), image.numel(), 0)
    return int(rc) == 0


def unpin_image(image: torch.Tensor) -> None:
    import torch

    if torch.cuda.is_available() and image.numel():
        cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        cudart.cudaHostUnregister(image.data_ptr())
