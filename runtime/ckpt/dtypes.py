"""Dtype names of the checkpoint index, and their safetensors and torch counterparts.

The index stores torch's names ("bfloat16", "float8_e4m3fn"); safetensors headers use short
codes ("BF16", "F8_E4M3"). Kept apart from ``index.py`` so reading an index needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.ckpt.index import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

# safetensors header code -> index dtype name (every code safetensors defines except complex,
# which the loader cannot view into a model parameter).
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an index dtype name (names are validated by ``read_index``)."""
    import torch

    if name not in DTYPE_SIZES:
        raise ValueError(f"unknown dtype {name!r}")
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def dtype_name(dtype: torch.dtype) -> str | None:
    """The index name of a torch dtype, or None when the format cannot store it."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_SIZES else None
