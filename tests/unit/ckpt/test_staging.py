"""The CUDA loader's copy pipeline, driven on CPU by a sink that copies asynchronously on its
own thread (as a CUDA stream would): order, buffer reuse, and the error paths."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
import torch

from runtime.ckpt.index import read_index
from runtime.loader.cuda import Chunk, copy_pipeline, image_to_device, plan_chunks, select_device
from sllm.errors import Unavailable
from tests.loaded import read_into_memory


class ThreadSink:
    """Copies run later, on a worker thread, ``delay`` seconds each; ``copy`` returns an
    event set once that copy has read its source."""

    def __init__(self, dest: torch.Tensor, delay: float = 0.0) -> None:
        self.dest = dest
        self.delay = delay
        self.jobs: queue.Queue[tuple[int, torch.Tensor, threading.Event]] = queue.Queue()
        self.log: list[tuple[str, int]] = []
        self.pending = 0
        self.finished_with_pending: list[int] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            at, src, done = self.jobs.get()
            time.sleep(self.delay)
            self.dest[at : at + src.numel()].copy_(src)
            self.pending -= 1
            done.set()
            self.jobs.task_done()

    def copy(self, at: int, src: torch.Tensor) -> Any:
        done = threading.Event()
        self.log.append(("copy", at))
        self.pending += 1
        self.jobs.put((at, src, done))
        return (at, done)

    def wait(self, handle: Any) -> None:
        at, done = handle
        done.wait()
        self.log.append(("wait", at))

    def finish(self) -> None:
        self.jobs.join()
        self.finished_with_pending.append(self.pending)
        self.log.append(("finish", -1))


def staged(host: torch.Tensor, buffers: list[torch.Tensor]) -> Any:
    def prepare(chunk: Chunk, slot: int) -> torch.Tensor:
        buf = buffers[slot][: chunk.length]
        buf.copy_(host[chunk.at : chunk.at + chunk.length])
        return buf

    return prepare


def test_staging_ring_waits_before_reusing_a_buffer() -> None:
    """Copies lag behind (10 ms each): a buffer refilled before its copy ran would put the
    wrong bytes on the device."""
    host = torch.randint(0, 255, (40 * 4096 + 123,), dtype=torch.uint8)
    dest = torch.zeros_like(host)
    chunks = plan_chunks(host.numel(), 4096)
    buffers = [torch.empty(4096, dtype=torch.uint8) for _ in range(2)]
    sink = ThreadSink(dest, delay=0.01)
    copy_pipeline(chunks, staged(host, buffers), sink, slots=2, threads=2)
    assert torch.equal(dest, host)
    copies = [at for kind, at in sink.log if kind == "copy"]
    assert copies == [c.at for c in chunks]  # handed over in order
    waits = [at for kind, at in sink.log if kind == "wait"]
    assert waits == copies[: len(chunks) - 2]  # each reuse waited for the copy that read it
    assert sink.log[-1] == ("finish", -1) and sink.finished_with_pending == [0]


def test_a_failed_preparation_waits_for_the_copies_in_flight() -> None:
    """The caller frees the sources and the device image as soon as this raises: by then no
    copy may still be running."""
    host = torch.randint(0, 255, (20 * 4096,), dtype=torch.uint8)
    dest = torch.zeros_like(host)
    buffers = [torch.empty(4096, dtype=torch.uint8) for _ in range(4)]
    fill = staged(host, buffers)
    prepared: list[int] = []

    def prepare(chunk: Chunk, slot: int) -> torch.Tensor:
        if chunk.at == 6 * 4096:
            raise OSError("DRAM image went away")
        prepared.append(chunk.at)
        return fill(chunk, slot)  # type: ignore[no-any-return]

    sink = ThreadSink(dest, delay=0.05)
    with pytest.raises(OSError, match="DRAM image went away"):
        copy_pipeline(plan_chunks(host.numel(), 4096), prepare, sink, slots=4, threads=2)
    assert sink.finished_with_pending == [0]  # finish ran, nothing left in flight
    copied = [at for kind, at in sink.log if kind == "copy"]
    assert copied == [c * 4096 for c in range(6)]  # everything before the failure, in order
    assert max(prepared) < 10 * 4096  # preparation never ran far past the failure
    assert torch.equal(dest[: 6 * 4096], host[: 6 * 4096])


def test_a_failed_copy_still_finishes_the_stream() -> None:
    class FailingSink(ThreadSink):
        def copy(self, at: int, src: torch.Tensor) -> Any:
            if at == 3 * 4096:
                raise RuntimeError("CUDA error: an illegal memory access")
            return super().copy(at, src)

    host = torch.randint(0, 255, (8 * 4096,), dtype=torch.uint8)
    buffers = [torch.empty(4096, dtype=torch.uint8) for _ in range(2)]
    sink = FailingSink(torch.zeros_like(host), delay=0.02)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        copy_pipeline(plan_chunks(host.numel(), 4096), staged(host, buffers), sink, slots=2)
    assert sink.finished_with_pending == [0]


def test_prepared_size_must_match_the_chunk() -> None:
    sink = ThreadSink(torch.zeros(8192, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prepared 10 bytes for a chunk of 4096"):
        copy_pipeline(
            plan_chunks(8192, 4096), lambda c, s: torch.zeros(10, dtype=torch.uint8), sink
        )


def test_chunks_are_page_multiples() -> None:
    assert plan_chunks(10_000, 4096) == [Chunk(0, 4096), Chunk(4096, 4096), Chunk(8192, 1808)]
    with pytest.raises(ValueError, match="multiple of 4096"):
        plan_chunks(10_000, 1000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_loader_without_cuda_is_a_clear_error(dtype_ckpt: Any) -> None:
    loaded = read_into_memory(dtype_ckpt)
    with pytest.raises(Unavailable, match="CUDA is not available"):
        image_to_device(read_index(dtype_ckpt), loaded.image, "cuda:0")
    with pytest.raises(Unavailable, match="CUDA is not available"):
        select_device("cuda:1")
