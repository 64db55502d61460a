"""Fixtures of the checkpoint-format tests: small sources written with safetensors/torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.ckpt.convert import convert_checkpoint


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype safetensors supports (except complex), plus 0-d and empty."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    tensors: dict[str, torch.Tensor] = {
        "f64": base.to(torch.float64),
        "f32": base,
        "f16": base.to(torch.float16),
        "bf16": base.to(torch.bfloat16),
        "f8_e4m3fn": base.to(torch.float8_e4m3fn),
        "f8_e5m2": base.to(torch.float8_e5m2),
        "f8_e4m3fnuz": base.to(torch.float8_e4m3fnuz),
        "f8_e5m2fnuz": base.to(torch.float8_e5m2fnuz),
        "i64": torch.arange(-7, 8, dtype=torch.int64).reshape(3, 5) * (1 << 40),
        "i32": torch.arange(-7, 8, dtype=torch.int32).reshape(3, 5) * (1 << 20),
        "i16": torch.arange(-7, 8, dtype=torch.int16),
        "i8": torch.arange(-7, 8, dtype=torch.int8),
        "u8": torch.arange(0, 250, 17, dtype=torch.uint8),
        "u16": torch.arange(0, 15, dtype=torch.int32).to(torch.uint16),
        "u32": torch.arange(0, 15, dtype=torch.int64).to(torch.uint32),
        "u64": torch.arange(0, 15, dtype=torch.int64).to(torch.uint64),
        "bool": base > 0,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(1000, 700, generator=g),  # spans several pages
    }
    return tensors


def as_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="session")
def dtype_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dtypes") / "hf"
    d.mkdir()
    save_file(all_dtype_tensors(), str(d / "model.safetensors"))
    (d / "config.json").write_text('{"model_type": "none"}')
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="session")
def dtype_ckpt(dtype_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("dtypes-ckpt") / "ckpt"
    convert_checkpoint(dtype_source, dst)
    return dst
