"""What a vLLM engine is built with (pure parts of runtime/backend/vllm_build.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.backend.vllm_build import (
    MIN_KV_CACHE_BYTES,
    VllmOptions,
    checkpoint_dtype,
    engine_plan,
    kv_cache_bytes,
)
from sllm.errors import ValidationFailed
from tests.synthetic_checkpoint import write_random_checkpoint

OPTIONS = VllmOptions(on_cpu=True, memory_bytes=256 << 20)


def entry(root: Path, name: str, seed: int, template: str = "{{ messages }}") -> Path:
    directory = root / name
    write_random_checkpoint(directory, partition_bytes=(8192,), seed=seed)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (directory / "chat_template.jinja").write_text(template)
    return directory


def test_kv_cache_is_the_memory_left_by_the_weights() -> None:
    assert kv_cache_bytes(1 << 30, 256 << 20) == 768 << 20
    with pytest.raises(ValidationFailed, match=r"resources.memory: 300 MiB leaves 44 MiB"):
        kv_cache_bytes(300 << 20, 256 << 20)
    assert kv_cache_bytes(MIN_KV_CACHE_BYTES + 1, 1) == MIN_KV_CACHE_BYTES


def test_plan_key_names_the_configuration_not_the_weights(tmp_path: Path) -> None:
    from runtime.ckpt.index import read_index

    a, b = entry(tmp_path, "a", 1), entry(tmp_path, "b", 2)
    other = entry(tmp_path, "c", 1, template="{{ tools }}")
    plan_a = engine_plan(a, read_index(a), OPTIONS)
    assert plan_a.dtype == checkpoint_dtype(read_index(a))
    assert plan_a.kv_bytes == OPTIONS.memory_bytes - sum(
        e.nbytes for e in read_index(a).tensors.values()
    )
    # other weights, same configuration: the engine can take them in place
    assert engine_plan(b, read_index(b), OPTIONS).key == plan_a.key
    # another chat template, another memory budget, an embedding engine: another engine
    assert engine_plan(other, read_index(other), OPTIONS).key != plan_a.key
    bigger = VllmOptions(on_cpu=True, memory_bytes=512 << 20)
    assert engine_plan(a, read_index(a), bigger).key != plan_a.key
    embed = VllmOptions(on_cpu=True, memory_bytes=256 << 20, task="embed")
    assert engine_plan(a, read_index(a), embed).key != plan_a.key
    # another share of the cores: the engine's threads differ
    shared = VllmOptions(on_cpu=True, memory_bytes=256 << 20, threads=2)
    assert engine_plan(a, read_index(a), shared).key != plan_a.key
