"""The converter lays the parts of each fused parameter (q/k/v, gate/up) side by side, in the
order vLLM fuses them, so that the fused parameter is one view of the image."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.ckpt.convert import convert_checkpoint, serving_order
from runtime.ckpt.index import image_layout, read_index
from runtime.ckpt.sources import SourceTensor
from tests.loaded import read_into_memory

from .conftest import as_bytes


def _named(*names: str) -> list[SourceTensor]:
    return [SourceTensor(n, "F32", (1,), 4, lambda: iter(())) for n in names]


def test_fused_parts_follow_each_other_at_the_first_ones_place() -> None:
    source = _named(
        "embed",
        "l0.mlp.down_proj.weight",
        "l0.mlp.up_proj.weight",
        "l0.attn.k_proj.weight",
        "l0.attn.o_proj.weight",
        "l0.mlp.gate_proj.weight",
        "l0.attn.q_proj.bias",
        "l0.attn.q_proj.weight",
        "l0.attn.v_proj.weight",
        "l1.attn.v_proj.weight",
        "l0.attn.k_proj.bias",
        "l0.attn.v_proj.bias",
        "norm",
    )
    assert [t.name for t in serving_order(source)] == [
        "embed",
        "l0.mlp.down_proj.weight",
        "l0.mlp.gate_proj.weight",
        "l0.mlp.up_proj.weight",
        "l0.attn.q_proj.weight",
        "l0.attn.k_proj.weight",
        "l0.attn.v_proj.weight",
        "l0.attn.o_proj.weight",
        "l0.attn.q_proj.bias",  # biases are a group of their own
        "l0.attn.k_proj.bias",
        "l0.attn.v_proj.bias",
        "l1.attn.v_proj.weight",  # another layer's part: not pulled into l0's group
        "norm",
    ]


def test_a_source_without_fused_parts_keeps_its_order() -> None:
    names = ["b", "a.weight", "c.q_norm.weight", "a.proj.weight"]
    assert [t.name for t in serving_order(_named(*names))] == names


def test_converted_qkv_are_one_run_of_bytes_and_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {  # safetensors stores them sorted: k, o, q, v
        f"model.layers.0.self_attn.{p}.weight": torch.randn(rows, 64, generator=g)
        for p, rows in (("q_proj", 64), ("k_proj", 16), ("v_proj", 16), ("o_proj", 64))
    }
    src = tmp_path / "hf"
    src.mkdir()
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "llama"}')
    convert_checkpoint(src, tmp_path / "ckpt")

    index = read_index(tmp_path / "ckpt")
    starts, _ = image_layout(index)
    at = {n: starts[t.partition] + t.offset for n, t in index.tensors.items()}
    q, k, v = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    assert at[k] == at[q] + index.tensors[q].nbytes
    assert at[v] == at[k] + index.tensors[k].nbytes
    loaded = read_into_memory(tmp_path / "ckpt")
    for name, ref in tensors.items():
        assert as_bytes(loaded.tensors[name]) == as_bytes(ref), name
