"""A DRAM image onto a CUDA device: chunked asynchronous host-to-device copies, each chunk
prepared (page-locked) while the previous one is copied.

What an instance on a GPU runs (``runtime.instance.loading``), after ``select_device``:

1. ``select_device`` makes the instance's device current before anything else touches CUDA,
   so the process opens its context there and nowhere else (a default context lands on GPU 0).
2. ``image_to_device`` allocates the device image on the current stream, makes a side stream
   wait for it, and runs ``copy_pipeline``: a preparation thread page-locks chunk k+1 (and
   later ones, up to ``SLOTS`` ahead) while chunk k's copy runs on the side stream.
   Preparation is ``cudaHostRegister`` of the chunk's range of the read-only DRAM mapping
   (flags portable | read-only: valid in every context, never written), or, where the driver
   refuses that, a memcpy into one of a ring of pinned staging buffers (a buffer is refilled
   only after the copy out of it completed). Nothing is pinned ahead of the load, and the
   whole image is never locked before the first copy starts.
3. Whatever happens, every copy issued has completed before any source is released:
   registrations are undone (``cudaHostUnregister``) and staging buffers dropped only after
   the side stream is synchronised, also when a preparation or a copy raised.

The pipeline is written against a small ``Sink`` port, so its ordering, buffer reuse and error
paths are tested on CPU (tests/unit/ckpt/test_staging.py); the CUDA sink and registration need a
GPU (tests/gpu).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.loader.cpu import tensor_views
from sllm.errors import CheckpointError, Unavailable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# 32 MiB chunks: H2D copies of >= 8 MiB run at full PCIe speed, and registering 32 MiB takes
# well under the time its copy does, so preparation stays ahead of the DMA.
CHUNK_BYTES = 32 << 20
# Chunks prepared ahead of the copies (and staging buffers in the staging mode).
SLOTS = 4
# cudaHostRegister flags (cuda_runtime_api.h): Portable = every context sees the range as
# pinned (not only the one current when registering); ReadOnly = the DRAM mapping is
# PROT_READ, so the driver must not ask for write access.
HOST_REGISTER_PORTABLE = 0x01
HOST_REGISTER_READ_ONLY = 0x08

Mode = Literal["registered", "staging"]


class Sink(Protocol):
    """Where prepared chunks go: ``copy`` starts an asynchronous copy of ``src`` into the
    destination at ``at`` and returns a handle; ``wait`` blocks until that copy no longer
    reads ``src``; ``finish`` blocks until every copy issued so far has completed."""

    def copy(self, at: int, src: torch.Tensor) -> Any: ...

    def wait(self, handle: Any) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class Chunk:
    at: int  # offset in the image (host and device alike)
    length: int


@dataclass(frozen=True)
class CopyStats:
    """What one ``image_to_device`` did. ``pinned_bytes``: bytes whose source was page-locked
    (``is_pinned``) when its copy was issued, i.e. copied by DMA without a driver bounce."""

    bytes: int
    seconds: float
    chunks: int
    mode: Mode
    pinned_bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class DeviceImage:
    index: CheckpointIndex
    image: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: CopyStats


def plan_chunks(size: int, chunk_bytes: int) -> list[Chunk]:
    if chunk_bytes <= 0 or chunk_bytes % 4096:
        raise ValueError(f"chunk_bytes must be a positive multiple of 4096, not {chunk_bytes}")
    return [Chunk(at, min(chunk_bytes, size - at)) for at in range(0, size, chunk_bytes)]


def copy_pipeline(
    chunks: Sequence[Chunk],
    prepare: Callable[[Chunk, int], torch.Tensor],
    sink: Sink,
    *,
    slots: int = SLOTS,
    threads: int = 1,
) -> None:
    """Prepare chunks on ``threads`` threads, up to ``slots`` ahead, and hand each to ``sink``
    in order. ``prepare(chunk, slot)`` returns the host tensor to copy (e.g. a registered
    range, or staging buffer ``slot`` filled); a slot is handed to ``prepare`` again only after
    the copy out of it completed (``sink.wait``). Returns, or raises the first error, only
    once every copy issued has completed (``sink.finish``) and no preparation is running."""
    if slots < 1:
        raise ValueError("slots must be >= 1")
    free: deque[int] = deque(range(slots))
    handles: list[Any] = [None] * slots
    ahead: deque[tuple[Future[torch.Tensor], int, Chunk]] = deque()

    def issue_next() -> None:
        future, slot, chunk = ahead.popleft()
        src = future.result()
        if src.numel() != chunk.length:
            raise ValueError(f"prepared {src.numel()} bytes for a chunk of {chunk.length}")
        handles[slot] = sink.copy(chunk.at, src)
        free.append(slot)

    try:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="sllm-h2d-prep") as pool:
            try:
                for chunk in chunks:
                    if not free:
                        issue_next()
                    slot = free.popleft()
                    if handles[slot] is not None:
                        sink.wait(handles[slot])
                        handles[slot] = None
                    ahead.append((pool.submit(prepare, chunk, slot), slot, chunk))
                while ahead:
                    issue_next()
            except BaseException:
                for future, _, _ in ahead:
                    future.cancel()
                raise  # leaving the pool waits for the preparations already running
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            sink.finish()
        raise
    sink.finish()


class CudaSink:
    """Asynchronous H2D copies on a side stream, one event per copy. The side stream waits
    for the stream the destination was allocated on (its allocation may still be pending
    there), and that stream waits for the side stream once ``finish`` is called, so work
    queued later on it sees the copied bytes."""

    def __init__(self, dest: torch.Tensor) -> None:
        import torch

        self.dest = dest
        self.origin = torch.cuda.current_stream(dest.device)
        self.stream = torch.cuda.Stream(device=dest.device)  # type: ignore[no-untyped-call]
        self.stream.wait_stream(self.origin)
        # the caching allocator must not hand the memory out again while the side stream
        # still writes it, should the image be dropped early
        dest.record_stream(self.stream)

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
        self.origin.wait_stream(self.stream)


def select_device(device: str) -> torch.device:
    """Make ``device`` ("cuda", "cuda:1") the process's current CUDA device, before anything
    else touches CUDA: the context (and every later pinned registration, stream and
    allocation) is then on that device. Raises ``Unavailable`` without CUDA or past the last
    device."""
    import torch

    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        raise Unavailable(f"device {device!r}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = 0 if target.index is None else target.index
    if index >= count:
        raise Unavailable(f"device {device!r}: this machine has {count} CUDA device(s)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class HostRegistration:
    """Page-locked ranges of host memory (``cudaHostRegister``, portable | read-only), all
    undone by ``close`` (``cudaHostUnregister``). Ranges must not share a page."""

    def __init__(self) -> None:
        import torch

        self._cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        self._ptrs: list[int] = []

    def register(self, ptr: int, nbytes: int) -> bool:
        flags = HOST_REGISTER_PORTABLE | HOST_REGISTER_READ_ONLY
        err = self._cudart.cudaHostRegister(ptr, nbytes, flags)
        if int(err) != 0:
            return False
        self._ptrs.append(ptr)
        return True

    def close(self) -> None:
        failed = 0
        for ptr in self._ptrs:
            failed += int(self._cudart.cudaHostUnregister(ptr)) != 0
        self._ptrs.clear()
        if failed:
            log.warning("cudaHostUnregister failed for %d range(s)", failed)


def image_to_device(
    index: CheckpointIndex,
    host_image: torch.Tensor,
    device: str,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    slots: int = SLOTS,
    staging: bool = False,
) -> DeviceImage:
    """Copy a host image (the DRAM tier's read-only mapping) onto ``device`` through
    ``copy_pipeline``; tensors are views of the device image. The mapping is registered chunk
    by chunk, falling back to pinned staging buffers where the driver refuses the first
    registration; ``staging`` forces the fallback (tests, benchmarks)."""
    import torch

    target = select_device(device)
    size = image_layout(index)[1]
    if host_image.numel() < size:
        raise CheckpointError(
            f"image holds {host_image.numel()} bytes, the checkpoint needs {size}"
        )
    chunks = plan_chunks(size, chunk_bytes)
    registration = HostRegistration()
    pinned: list[int] = []  # appended from the preparation threads (list.append is atomic)
    began = time.perf_counter()
    mode: Mode = "staging" if staging else "registered"
    try:
        # the first chunk is registered here: a refusal (no read-only registration on this
        # driver) switches the whole copy to staging before any copy is issued
        if (
            mode == "registered"
            and chunks
            and not registration.register(host_image.data_ptr(), chunks[0].length)
        ):
            log.info("DRAM image not registrable on %s: copying through staging", target)
            mode = "staging"
        buffers = (
            [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
            if mode == "staging"
            else []
        )

        def prepare(chunk: Chunk, slot: int) -> torch.Tensor:
            src = host_image[chunk.at : chunk.at + chunk.length]
            if mode == "staging":
                src = buffers[slot][: chunk.length]
                src.copy_(host_image[chunk.at : chunk.at + chunk.length])
            elif chunk.at != 0 and not registration.register(src.data_ptr(), chunk.length):
                raise Unavailable(f"cudaHostRegister refused the DRAM image at byte {chunk.at}")
            if src.is_pinned():
                pinned.append(chunk.length)
            return src

        image = torch.empty(size, dtype=torch.uint8, device=target)
        copy_pipeline(
            chunks, prepare, CudaSink(image), slots=slots, threads=2 if mode == "staging" else 1
        )
    finally:
        registration.close()  # after copy_pipeline: no copy reads a registered range any more
    stats = CopyStats(size, time.perf_counter() - began, len(chunks), mode, sum(pinned))
    return DeviceImage(index, image, tensor_views(index, image), stats)
