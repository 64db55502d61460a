"""The peer and the two models of bench/backends.py. Models, made once under
bench/.data/backends: SmolLM2-135M-Instruct (the demo's GGUF through sllm's converter, exported
as a Hugging Face safetensors directory for the peer) and a random Llama of ~1.1B parameters
with SmolLM2's tokenizer (bfloat16)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

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
    from tests.smollm2 import ensure_smollm2_checkpoint

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


class Peer:
    """``python -m vllm.entrypoints.openai.api_server`` on one model."""

    def __init__(self, model: Path, root: Path, *, compiled: bool) -> None:
        from sllm_cli.servers import free_port

        self.model, self.port = str(model), free_port()
        # a compile cache per run (VLLM_CACHE_ROOT): the first compiled start compiles
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(root / "vllm-cache")}  # fmt: skip
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                self.model, "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", "2048"] + ([] if compiled else ["--enforce-eager"])  # fmt: skip
        self.started = time.monotonic()
        with open(root / f"peer-{model.name}-{'compiled' if compiled else 'eager'}.log", "ab") as f:
            self.proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 1200.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "the peer exited"
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the peer did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        from sllm_cli.servers import stop_process

        stop_process(self.proc, 60)
