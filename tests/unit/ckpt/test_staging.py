"""The staged-copy pipeline of the CUDA loader, driven on CPU with a synchronous sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.ckpt.index import image_layout, read_index
from runtime.loader.cpu import load_checkpoint
from runtime.loader.cuda import (
    allocate_staging,
    file_chunks,
    image_chunks,
    image_to_cuda,
    load_to_cuda,
    stage_chunks,
)
from sllm.errors import Unavailable


class CpuSink:
    """Copies at once into a CPU image; records the order of copies and waits."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest
        self.log: list[tuple[str, int]] = []

    def copy(self, at: int, src: torch.Tensor) -> Any:
        self.dest[at : at + src.numel()].copy_(src)
        self.log.append(("copy", at))
        return at

    def wait(self, handle: Any) -> None:
        self.log.append(("wait", handle))

    def finish(self) -> None:
        self.log.append(("finish", -1))


def test_file_chunks_through_two_staging_buffers(dtype_ckpt: Path) -> None:
    index = read_index(dtype_ckpt)
    size = image_layout(index)[1]
    dest = torch.zeros(size, dtype=torch.uint8)
    staging = allocate_staging(2, 64 << 10, pin=False)
    chunks, close = file_chunks(dtype_ckpt, index, 64 << 10, aligned=False)
    try:
        total, direct = stage_chunks(chunks, staging, sink := CpuSink(dest), threads=2)
    finally:
        close()
    assert len(chunks) > 10
    assert total == index.total_bytes and direct == 0
    assert torch.equal(dest, load_checkpoint(dtype_ckpt).image)
    copies = [at for kind, at in sink.log if kind == "copy"]
    assert copies == sorted(copies)  # handed over in order
    assert sink.log[-1] == ("finish", -1)
    # every buffer reuse waited for the copy that last read it
    waits = [at for kind, at in sink.log if kind == "wait"]
    assert waits == copies[: len(waits)] and len(waits) == len(chunks) - 2


def test_image_chunks_copy_an_in_memory_image(dtype_ckpt: Path) -> None:
    loaded = load_checkpoint(dtype_ckpt)
    size = loaded.image.numel()
    dest = torch.zeros(size, dtype=torch.uint8)
    chunks = image_chunks(loaded.image, size, 100_000)  # not a multiple of the page size
    stage_chunks(chunks, allocate_staging(3, 100_000, pin=False), CpuSink(dest), threads=2)
    assert torch.equal(dest, loaded.image)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_loader_without_cuda_is_a_clear_error(dtype_ckpt: Path) -> None:
    with pytest.raises(Unavailable, match="CUDA is not available"):
        load_to_cuda(dtype_ckpt)
    loaded = load_checkpoint(dtype_ckpt)
    with pytest.raises(Unavailable, match="CUDA is not available"):
        image_to_cuda(loaded.index, loaded.image)
