"""Parameters bound to the DRAM image (runtime.backend.vllm_loader.bind_views): a module laid
out as vLLM's Llama lays its parameters out, over a real image tensor."""

from __future__ import annotations

import torch
from torch import nn

from runtime.backend.vllm_loader import bind_views

ROWS = {"q_proj": 64, "k_proj": 16, "v_proj": 16, "o_proj": 64}


class LlamaForCausalLM(nn.Module):
    """vLLM's parameter names and shapes for one attention block (q/k/v fused)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = nn.Module()
        attn = nn.Module()
        attn.qkv_proj = nn.Linear(64, 96, bias=False, dtype=dtype)
        attn.o_proj = nn.Linear(64, 64, bias=False, dtype=dtype)
        self.model.attn = attn
        self.model.norm = nn.LayerNorm(64, bias=False, dtype=dtype)


class OtherForCausalLM(LlamaForCausalLM):
    pass


def _image(order: list[str], gap: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image holding the checkpoint's tensors in ``order``, ``gap`` bytes after each."""
    g = torch.Generator().manual_seed(0)
    parts = {p: torch.randn(ROWS[p], 64, generator=g) for p in ROWS}
    parts["norm"] = torch.randn(64, generator=g)
    image = torch.zeros(sum(t.nbytes + gap for t in parts.values()), dtype=torch.uint8)
    views: dict[str, torch.Tensor] = {}
    pos = 0
    for p in order:
        t = parts[p]
        image[pos : pos + t.nbytes] = t.reshape(-1).view(torch.uint8)
        name = "model.norm.weight" if p == "norm" else f"model.attn.{p}.weight"
        views[name] = image[pos : pos + t.nbytes].view(torch.float32).view(t.shape)
        pos += t.nbytes + gap
    return image, views


def _inside(t: torch.Tensor, image: torch.Tensor) -> bool:
    start = image.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + image.nbytes


def test_adjacent_parts_become_one_view_and_nothing_is_copied() -> None:
    image, views = _image(["q_proj", "k_proj", "v_proj", "o_proj", "norm"])
    model = LlamaForCausalLM()
    bound, used = bind_views(model, views, image)
    assert bound == {"model.attn.qkv_proj.weight", "model.attn.o_proj.weight", "model.norm.weight"}
    assert used == set(views)
    qkv = model.model.attn.qkv_proj.weight
    assert _inside(qkv, image) and qkv.data_ptr() == views["model.attn.q_proj.weight"].data_ptr()
    expected = torch.cat([views[f"model.attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(qkv, expected)
    assert _inside(model.model.norm.weight, image)


def test_parts_out_of_order_or_apart_are_left_to_the_copy() -> None:
    for image, views in (
        _image(["k_proj", "o_proj", "q_proj", "v_proj", "norm"]),  # safetensors' sorted order
        _image(["q_proj", "k_proj", "v_proj", "o_proj", "norm"], gap=4096),
    ):
        model = LlamaForCausalLM()
        bound, used = bind_views(model, views, image)
        assert bound == {"model.attn.o_proj.weight", "model.norm.weight"}
        assert not _inside(model.model.attn.qkv_proj.weight, image)
        assert "model.attn.q_proj.weight" not in used


def test_another_dtype_or_model_class_binds_nothing() -> None:
    image, views = _image(["q_proj", "k_proj", "v_proj", "o_proj", "norm"])
    assert bind_views(LlamaForCausalLM(torch.bfloat16), views, image) == (set(), set())
    assert bind_views(OtherForCausalLM(), views, image) == (set(), set())
