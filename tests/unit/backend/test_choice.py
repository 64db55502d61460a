"""The backend choice (pure): what the function asks for, what the model is, what vLLM has."""

from __future__ import annotations

import pytest

from runtime.backend.choice import ModelFacts, VllmSupport, choose_backend
from sllm.errors import ValidationFailed

VLLM = VllmSupport("0.32.0", frozenset({"LlamaForCausalLM"}), frozenset({32, 64, 128}))
LLAMA = ModelFacts(("LlamaForCausalLM",), 64)


@pytest.mark.parametrize(
    ("requested", "model", "vllm", "on_cpu", "backend", "reason"),
    [
        ("auto", LLAMA, VLLM, True, "vllm", "auto: vLLM 0.32.0 supports the model"),
        ("auto", LLAMA, None, True, "transformers", "vLLM is not installed on this node"),
        ("auto", ModelFacts(("MambaLM",), 64), VLLM, True, "transformers",
         "does not support the architecture MambaLM"),
        ("auto", ModelFacts(("LlamaForCausalLM",), 16), VLLM, True, "transformers",
         "CPU attention has no kernel for head size 16 (it has 32, 64, 128)"),
        # the head-size limit is the CPU attention backend's only
        ("auto", ModelFacts(("LlamaForCausalLM",), 16), VLLM, False, "vllm", "supports"),
        ("auto", ModelFacts((), None), VLLM, True, "transformers", "names no architecture"),
        ("transformers", LLAMA, VLLM, True, "transformers", "asks for transformers"),
        ("vllm", LLAMA, VLLM, True, "vllm", "asks for vllm"),
    ],
)  # fmt: skip
def test_choice(
    requested: str,
    model: ModelFacts,
    vllm: VllmSupport | None,
    on_cpu: bool,
    backend: str,
    reason: str,
) -> None:
    choice = choose_backend(requested, model, vllm, on_cpu=on_cpu)
    assert choice.backend == backend
    assert reason in choice.reason


def test_vllm_requested_but_unsupported_is_an_error_naming_why() -> None:
    with pytest.raises(ValidationFailed, match=r"backend: vllm: vLLM 0\.32\.0 does not support"):
        choose_backend("vllm", ModelFacts(("MambaLM",), 64), VLLM, on_cpu=True)
    with pytest.raises(ValidationFailed, match="backend: vllm: vLLM is not installed"):
        choose_backend("vllm", LLAMA, None, on_cpu=True)


def test_model_facts_from_config() -> None:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9}
    assert ModelFacts.from_config(config) == ModelFacts(("LlamaForCausalLM",), 64)
    assert ModelFacts.from_config({**config, "head_dim": 128}).head_dim == 128
    assert VllmSupport.from_dict(VLLM.to_dict()) == VLLM
