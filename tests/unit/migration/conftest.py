"""An engine over the tiny model for the instance-side migration tests (one per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.engine.engine import Engine
from runtime.engine.prompts import Tokenizing


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    engine = Engine(model, tok.decode, eos_ids=[tokenizer.eos_token_id], max_batch=8)
    engine.start()
    yield engine
    engine.stop()
