"""Issue 14, bug 5: one request's failure ends only that request, and a model whose cache the
engine cannot batch fails at load with the reason (instead of reporting ready and failing
every request). Faults are injected into the tiny model's forward pass at a known input."""

from __future__ import annotations

import functools
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.engine.engine import Engine
from runtime.engine.prompts import Tokenizing
from runtime.engine.request import ErrorEvent, Event, FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from sllm.errors import UnsupportedModel

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
POISON = 7  # a prompt holding this token id fails its prefill, as an out-of-memory would


class Faults:
    """Wraps a model's forward: prefills containing ``POISON`` raise ``MemoryError``; the next
    ``fail_batched_steps`` decoding steps over more than one row raise ``RuntimeError``."""

    def __init__(self, model: Any) -> None:
        self.fail_batched_steps = 0
        self.batched_steps = 0
        forward = model.forward

        @functools.wraps(forward)
        def faulty(*args: Any, **kwargs: Any) -> Any:
            ids: torch.Tensor = kwargs["input_ids"]
            if ids.shape[1] > 1 and bool((ids == POISON).any()):
                raise MemoryError("out of memory (injected)")
            if ids.shape[0] > 1 and ids.shape[1] == 1:
                self.batched_steps += 1
                if self.fail_batched_steps > 0:
                    self.fail_batched_steps -= 1
                    raise RuntimeError("device error (injected)")
            return forward(*args, **kwargs)

        model.forward = faulty


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path) -> Iterator[tuple[Engine, Faults, Tokenizing]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    faults = Faults(model)
    tok = Tokenizing(AutoTokenizer.from_pretrained(tiny_model_dir))
    engine = Engine(model, tok.decode, max_batch=8)
    engine.start()
    yield engine, faults, tok
    engine.stop()


def submit(engine: Engine, rid: str, ids: list[int]) -> queue.Queue[Event]:
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(RequestState(rid, ids, PARAMS), events.put)
    return events


def outcome(events: queue.Queue[Event]) -> list[int] | ErrorEvent:
    ids: list[int] = []
    while True:
        event = events.get(timeout=60)
        if isinstance(event, ErrorEvent):
            return event
        if isinstance(event, TokenEvent):
            ids += event.token_ids
        if isinstance(event, FinishEvent):
            return ids


def test_a_failed_prefill_ends_only_its_request(
    setup: tuple[Engine, Faults, Tokenizing],
) -> None:
    engine, _, _ = setup
    good = [[1, 2, 3, 4], [5, 6, 8, 9, 10]]
    alone = [outcome(submit(engine, f"alone-{i}", ids)) for i, ids in enumerate(good)]
    first = submit(engine, "good-0", good[0])
    bad = submit(engine, "bad", [1, POISON, 2])
    second = submit(engine, "good-1", good[1])
    failed = outcome(bad)
    assert isinstance(failed, ErrorEvent) and failed.code == "engine_error"
    assert "out of memory" in failed.message
    assert [outcome(first), outcome(second)] == alone
    assert outcome(submit(engine, "after", good[0])) == alone[0]  # the engine still serves


def test_a_failed_decoding_step_is_recovered_row_by_row(
    setup: tuple[Engine, Faults, Tokenizing],
) -> None:
    engine, faults, _ = setup
    prompts = [[11, 12, 13], [14, 15, 16, 17], [18, 19]]
    alone = [outcome(submit(engine, f"ref-{i}", ids)) for i, ids in enumerate(prompts)]
    before = faults.batched_steps
    faults.fail_batched_steps = 2
    queues = [submit(engine, f"batched-{i}", ids) for i, ids in enumerate(prompts)]
    assert [outcome(q) for q in queues] == alone  # same tokens: nothing lost or repeated
    assert faults.fail_batched_steps == 0 and faults.batched_steps > before + 2


def test_a_sliding_window_model_fails_at_load_with_the_reason() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        sliding_window=8,
    )
    model: Any = MistralForCausalLM(config).eval()
    with pytest.raises(UnsupportedModel, match=r"DynamicSlidingWindowLayer.*cannot batch"):
        Engine(model, lambda ids: "")
