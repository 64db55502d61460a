"""Which backend an instance runs (pure): the function's ``backend`` setting, the model's
facts (from its ``config.json``) and what the node's vLLM supports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.errors import ValidationFailed


@dataclass(frozen=True)
class ModelFacts:
    """What the choice needs to know of a checkpoint."""

    architectures: tuple[str, ...]
    head_dim: int | None

    @staticmethod
    def from_config(config: dict[str, Any]) -> ModelFacts:
        archs = config.get("architectures") or ()
        head_dim = config.get("head_dim")
        if not isinstance(head_dim, int):
            hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
            head_dim = hidden // heads if isinstance(hidden, int) and heads else None
        return ModelFacts(tuple(str(a) for a in archs), head_dim)

    @staticmethod
    def read(checkpoint_dir: Path) -> ModelFacts:
        """From ``checkpoint_dir/config.json``; a missing or unreadable one gives no facts
        (the model build names the problem). A config without ``architectures`` (GGUF
        conversions before they wrote it) gets its ``model_type``'s causal-LM class."""
        try:
            config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        except (OSError, ValueError):
            return ModelFacts((), None)
        config = config if isinstance(config, dict) else {}
        facts = ModelFacts.from_config(config)
        if not facts.architectures:
            arch = causal_lm_architecture(str(config.get("model_type", "")))
            facts = ModelFacts((arch,) if arch else (), facts.head_dim)
        return facts


def causal_lm_architecture(model_type: str) -> str | None:
    """transformers' causal-LM class name for ``model_type`` ("llama" -> LlamaForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class VllmSupport:
    """What the node's vLLM can run (``runtime.backend.probe``). ``cpu_head_sizes``: the head
    sizes vLLM's CPU attention backend has kernels for (it refuses others at engine start)."""

    version: str
    architectures: frozenset[str]
    cpu_head_sizes: frozenset[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "architectures": sorted(self.architectures),
            "cpu_head_sizes": sorted(self.cpu_head_sizes),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> VllmSupport:
        return VllmSupport(
            version=str(data["version"]),
            architectures=frozenset(str(a) for a in data["architectures"]),
            cpu_head_sizes=frozenset(int(h) for h in data["cpu_head_sizes"]),
        )


@dataclass(frozen=True)
class BackendChoice:
    """``backend``: "vllm" or "transformers"; ``reason``: why, in a sentence for operators
    (shown by ``sllm fn describe``)."""

    backend: str
    reason: str


def vllm_refusal(model: ModelFacts, vllm: VllmSupport, on_cpu: bool) -> str | None:
    """Why ``vllm`` cannot run ``model`` (None: it can)."""
    if not model.architectures:
        return "the model's config.json names no architecture"
    unknown = [a for a in model.architectures if a not in vllm.architectures]
    if len(unknown) == len(model.architectures):
        return f"vLLM {vllm.version} does not support the architecture {', '.join(unknown)}"
    if on_cpu and model.head_dim is not None and model.head_dim not in vllm.cpu_head_sizes:
        sizes = ", ".join(str(h) for h in sorted(vllm.cpu_head_sizes))
        return (
            f"vLLM {vllm.version}'s CPU attention has no kernel for head size {model.head_dim} "
            f"(it has {sizes})"
        )
    return None


def choose_backend(
    requested: str,
    model: ModelFacts,
    vllm: VllmSupport | None,
    *,
    on_cpu: bool,
    vllm_missing: str = "vLLM is not installed on this node",
) -> BackendChoice:
    """The backend for one instance. ``vllm`` None: the node has no usable vLLM
    (``vllm_missing`` says why). ``backend: vllm`` that cannot run raises ValidationFailed
    naming the reason; ``auto`` then falls back to transformers and says why."""
    if requested == "transformers":
        return BackendChoice("transformers", "the function asks for transformers")
    refusal = vllm_missing if vllm is None else vllm_refusal(model, vllm, on_cpu)
    if requested == "vllm":
        if refusal is not None:
            raise ValidationFailed(f"backend: vllm: {refusal}")
        return BackendChoice("vllm", "the function asks for vllm")
    if requested != "auto":
        raise ValidationFailed(f"backend: expected auto, vllm or transformers, got {requested!r}")
    if refusal is not None:
        return BackendChoice("transformers", f"auto fell back to transformers: {refusal}")
    assert vllm is not None
    return BackendChoice("vllm", f"auto: vLLM {vllm.version} supports the model")
