"""Models built on meta from loaded checkpoints generate exactly like transformers' own load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.ckpt.convert import convert_checkpoint
from runtime.loader.cpu import entry_tensors
from runtime.loader.model import build_model, load_tokenizer
from tests.loaded import dram_entry, read_into_memory
from tests.tiny_model import TinyConfig, build_tiny_llama

PROMPTS = ["The capital of France is", "hello world, how"]


def _greedy(model: torch.nn.Module, tokenizer: object, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # type: ignore[operator]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)  # type: ignore[operator]
    return [int(t) for t in out[0, ids.shape[1] :]]


def _assert_same_generation(hf_dir: Path, ckpt: Path, dram_root: Path) -> None:
    """The model built from a DRAM entry's tensors (the instance's path: the reader fills the
    entry, ``entry_tensors`` maps it) generates like ``from_pretrained``, its parameters
    being views of the mapped image (no per-tensor copy)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf_dir)
    entry = entry_tensors(dram_entry(ckpt, dram_root))
    model = build_model(ckpt, entry.tensors)
    tokenizer = load_tokenizer(ckpt)
    for prompt in PROMPTS:
        assert _greedy(model, tokenizer, prompt) == _greedy(reference, tokenizer, prompt)
    base, size = entry.image.data_ptr(), entry.image.numel()
    for name, param in model.named_parameters():
        assert param.data_ptr() == entry.tensors[name].data_ptr(), name
        assert base <= param.data_ptr() < base + size, name
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_tiny_llama_generates_like_from_pretrained(
    tiny_model_dir: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    _assert_same_generation(tiny_model_dir, tiny_ckpt, tmp_path / "dram")
    model = build_model(tiny_ckpt, read_into_memory(tiny_ckpt).tensors)
    assert model.training is False
    assert model.generation_config.eos_token_id is not None


def _write_sharded_bins(hf: Path, dst: Path) -> None:
    """``hf`` rewritten as 3 ``pytorch_model-*.bin`` shards (transformers 5 writes only
    safetensors); the tied lm_head/embedding pair share storage in the first shard."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    dst.mkdir()
    for f in hf.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, dst / f.name)
    state = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    names = list(state)
    first = ["model.embed_tokens.weight", "lm_head.weight"]
    rest = [n for n in names if n not in first]
    shards = [
        first + rest[: len(rest) // 2],
        rest[len(rest) // 2 :][:5],
        rest[len(rest) // 2 :][5:],
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({n: state[n] for n in shard}, dst / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_tied_sharded_bin_llama_generates_like_from_pretrained(tmp_path: Path) -> None:
    hf = build_tiny_llama(tmp_path / "hf", seed=1, config=TinyConfig(tie_word_embeddings=True))
    bins = tmp_path / "bins"
    _write_sharded_bins(hf, bins)
    index = convert_checkpoint(bins, tmp_path / "ckpt")
    assert index.metadata["source_format"] == "pytorch"
    assert index.aliases == {"lm_head.weight": "model.embed_tokens.weight"}  # stored once
    assert "lm_head.weight" not in index.tensors
    _assert_same_generation(hf, tmp_path / "ckpt", tmp_path / "dram")
    model = build_model(tmp_path / "ckpt", read_into_memory(tmp_path / "ckpt").tensors)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_safetensors_llama_generates_like_from_pretrained(tmp_path: Path) -> None:
    """safetensors drop the tied lm_head; build_model ties it back from the config."""
    hf = build_tiny_llama(tmp_path / "hf", seed=2, config=TinyConfig(tie_word_embeddings=True))
    convert_checkpoint(hf, tmp_path / "ckpt")
    _assert_same_generation(hf, tmp_path / "ckpt", tmp_path / "dram")


def test_tensors_on_two_devices_are_refused(tiny_ckpt: Path) -> None:
    from sllm.errors import CheckpointError

    tensors = dict(read_into_memory(tiny_ckpt).tensors)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to("meta")
    with pytest.raises(CheckpointError, match=r"tensors must be on one device \(cpu, meta\)"):
        build_model(tiny_ckpt, tensors)


def test_missing_weight_is_named(tiny_ckpt: Path) -> None:
    from sllm.errors import CheckpointError

    tensors = dict(read_into_memory(tiny_ckpt).tensors)
    del tensors["model.norm.weight"]
    with pytest.raises(
        CheckpointError, match=r"lacks 1 weight\(s\) the model needs: model\.norm\.weight"
    ):
        build_model(tiny_ckpt, tensors)


def test_smollm2_demo_answers_paris(smollm2_ckpt: Path) -> None:
    loaded = read_into_memory(smollm2_ckpt)
    assert loaded.index.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    model = build_model(smollm2_ckpt, loaded.tensors)
    tokenizer = load_tokenizer(smollm2_ckpt)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    # one thread: on this shared 2-core machine two OpenMP threads spin against other work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_demo_names_its_architecture(smollm2_ckpt: Path) -> None:
    """The backend choice (and vLLM) pick the model class by config.json's architectures,
    which transformers' GGUF config leaves out: conversions write it, older ones get it from
    their model_type."""
    from runtime.backend.choice import ModelFacts

    assert ModelFacts.read(smollm2_ckpt) == ModelFacts(("LlamaForCausalLM",), 64)
