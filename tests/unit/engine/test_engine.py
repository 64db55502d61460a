"""The batching engine on a real (tiny) model: batched equals alone, seeded sampling resumes
exactly, stops, limits, cancellation."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
import torch

from runtime.engine.request import FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from sllm.errors import Conflict, InvalidInput

from .conftest import EngineHarness

PROMPTS = [
    "hello world",
    "The capital of France is",
    "Tokens are generated one at a time; the key",
    "0",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
_ids = itertools.count()


def state(h: EngineHarness, prompt: str, params: SamplingParams) -> RequestState:
    return RequestState(f"t{next(_ids)}", h.tok.encode(prompt, special=True), params)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batched_output_equals_output_alone(harness: EngineHarness, params: SamplingParams) -> None:
    alone = [harness.run(state(harness, p, params)).ids for p in PROMPTS]
    queues = [harness.submit(state(harness, p, params)) for p in PROMPTS]
    batched = [harness.collect(q).ids for q in queues]
    assert batched == alone
    assert all(len(ids) == 24 for ids in alone)


def test_greedy_matches_transformers_generate(harness: EngineHarness) -> None:
    model: Any = harness.engine.model
    ids = harness.tok.encode(PROMPTS[1], special=True)
    expected = model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24
    )[0, len(ids) :].tolist()
    assert harness.run(state(harness, PROMPTS[1], GREEDY)).ids == expected


def test_a_request_joining_mid_generation_is_unaffected(harness: EngineHarness) -> None:
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    expected_long = harness.run(state(harness, PROMPTS[2], long)).ids
    expected_short = harness.run(state(harness, PROMPTS[0], GREEDY)).ids
    first = harness.submit(state(harness, PROMPTS[2], long))
    head = first.get(timeout=30)  # the long one is decoding
    assert isinstance(head, TokenEvent)
    second = harness.submit(state(harness, PROMPTS[0], GREEDY))
    assert harness.collect(second).ids == expected_short
    assert head.token_ids + harness.collect(first).ids == expected_long


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resuming_from_exported_state_continues_identically(
    harness: EngineHarness, params: SamplingParams
) -> None:
    full = harness.run(state(harness, PROMPTS[1], params))
    head = state(harness, PROMPTS[1], params)
    head.output_ids = full.ids[:9]
    resumed = RequestState.from_export(head.export())
    assert resumed.steps == 9
    assert harness.run(resumed).ids == full.ids[9:]


def test_max_tokens_ends_with_length_and_counts_usage(harness: EngineHarness) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    s = state(harness, PROMPTS[0], params)
    out = harness.run(s)
    assert out.finish.finish_reason == "length"
    assert out.finish.usage() == {
        "prompt_tokens": len(s.prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(s.prompt_ids) + 5,
    }
    assert len([e for e in out.events if isinstance(e, TokenEvent)]) == 5


def test_stop_string_ends_generation_before_it(harness: EngineHarness) -> None:
    text = harness.run(state(harness, PROMPTS[1], GREEDY)).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop from {text!r}"
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,), ignore_eos=True)
    out = harness.run(state(harness, PROMPTS[1], params))
    assert out.finish.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_cancel_ends_the_request(harness: EngineHarness) -> None:
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    s = state(harness, PROMPTS[0], params)
    events = harness.submit(s)
    events.get(timeout=30)
    harness.engine.cancel(s.request_id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        event = events.get(timeout=30)
        if isinstance(event, FinishEvent):
            assert event.finish_reason == "cancelled"
            assert event.completion_tokens < 400
            break
    assert harness.engine.load().in_flight == 0


def test_prompt_longer_than_the_context_is_refused(harness: EngineHarness) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(InvalidInput, match="context"):
        harness.engine.submit(RequestState("too-long", [5] * 600, params), lambda e: None)


def test_duplicate_request_id_is_refused(harness: EngineHarness) -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    s = state(harness, PROMPTS[0], params)
    events = harness.submit(s)
    with pytest.raises(Conflict):
        harness.engine.submit(RequestState(s.request_id, [1, 2], params), lambda e: None)
    harness.engine.cancel(s.request_id)
    harness.collect(events)


def test_resume_takes_a_staged_cache_and_continues_identically(harness: EngineHarness) -> None:
    from runtime.engine.forward import forward, new_cache

    model: Any = harness.engine.model
    full = harness.run(state(harness, PROMPTS[2], SEEDED))
    head = state(harness, PROMPTS[2], SEEDED)
    head.output_ids = full.ids[:6]
    covered = (head.prompt_ids + head.output_ids)[:-1]
    cache = new_cache(model)
    with torch.no_grad():
        forward(model, cache, torch.tensor([covered]))
    harness.engine.staged[head.request_id] = (cache, covered)
    assert harness.run(head).ids == full.ids[6:]
    assert head.request_id not in harness.engine.staged
