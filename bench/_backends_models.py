"""The two models of bench/backends.py, made once under bench/.data/backends: SmolLM2-135M-Instruct
(the demo's GGUF through sllm's converter, exported as a Hugging Face safetensors directory for
the peer) and a random Llama of ~1.1B parameters with SmolLM2's tokenizer (bfloat16)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / ".data" / "backends"


def export_hf(ckpt: Path, dst: Path) -> Path:
    """An sllm checkpoint as a Hugging Face safetensors directory (what the peer loads)."""
    from safetensors.torch import save_file

    from runtime.ckpt.index import image_layout, read_index
    from runtime.loader.cpu import allocate_image, tensor_views, writable_view
    from runtime.loader.read import read_checkpoint

    if (dst / "model.safetensors").exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = read_index(ckpt)  # the one checkpoint reader (runtime/loader/read.py)
    image = allocate_image(image_layout(index)[1], touch=False)
    read_checkpoint(ckpt, index, writable_view(image))
    views = tensor_views(index, image)
    tensors = {k: v.clone() for k, v in views.items() if k not in index.aliases}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in index.files:
        shutil.copy(ckpt / name, tmp / name)
    tmp.rename(dst)
    return dst


def build_models() -> dict[str, Path]:
    """HF directories of both models (bfloat16), made once under bench/.data."""
    from runtime.ckpt.demo import ensure_smollm2_checkpoint

    DATA.mkdir(parents=True, exist_ok=True)
    smol = export_hf(ensure_smollm2_checkpoint(DATA / "convert"), DATA / "hf-smollm2")
    big = DATA / "hf-llama1b"
    if not (big / "model.safetensors").exists():
        build_llama1b(smol, big)
    return {"smollm2": smol, "llama1b": big}


def build_llama1b(tokenizer_from: Path, dst: Path) -> None:
    """A random Llama of ~1.1B parameters with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)
