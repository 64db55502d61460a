"""The CUDA loader on a real GPU (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from runtime.ckpt.convert import convert_checkpoint

    src = tmp_path_factory.mktemp("gpu-src") / "w.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "a": torch.randn(3000, 1000, generator=g).to(torch.bfloat16),
            "b": torch.randn(17, generator=g),
            "c": torch.arange(10, dtype=torch.int64),
        },
        str(src),
    )
    dst = tmp_path_factory.mktemp("gpu-ckpt") / "ckpt"
    convert_checkpoint(src, dst, partition_bytes=2 << 20)
    return dst


def test_load_to_cuda_matches_cpu_load(ckpt: Path) -> None:
    from runtime.loader.cpu import load_checkpoint
    from runtime.loader.cuda import load_to_cuda

    cpu = load_checkpoint(ckpt)
    dev = load_to_cuda(ckpt, chunk_bytes=1 << 20, buffers=2)
    assert dev.image.is_cuda
    for name, t in cpu.tensors.items():
        assert torch.equal(dev.tensors[name].cpu(), t), name


@pytest.mark.parametrize("pinned", [False, True])
def test_image_to_cuda(ckpt: Path, pinned: bool) -> None:
    from runtime.loader.cpu import load_checkpoint
    from runtime.loader.cuda import image_to_cuda, pin_image, unpin_image

    cpu = load_checkpoint(ckpt)
    if pinned:
        assert pin_image(cpu.image)
    try:
        dev = image_to_cuda(cpu.index, cpu.image, chunk_bytes=1 << 20)
    finally:
        if pinned:
            unpin_image(cpu.image)
    for name, t in cpu.tensors.items():
        assert torch.equal(dev.tensors[name].cpu(), t), name
