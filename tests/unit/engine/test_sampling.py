"""Sampling parameters and the seeded sampler."""

from __future__ import annotations

import pytest
import torch

from runtime.engine.sampling import (
    SamplingDefaults,
    SamplingParams,
    parse_sampling,
    sample_token,
)
from sllm.errors import InvalidInput

LOGITS = torch.tensor([0.5, 2.0, 1.0, -1.0, 0.0, 1.5])


def test_greedy_takes_the_argmax() -> None:
    assert sample_token(LOGITS, SamplingParams(temperature=0.0), 0) == 1


def test_seeded_draw_depends_only_on_seed_and_step() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [sample_token(LOGITS, params, step) for step in range(50)]
    assert draws == [sample_token(LOGITS, params, step) for step in range(50)]
    assert len(set(draws)) > 2  # it does sample
    other = [sample_token(LOGITS, SamplingParams(temperature=1.0, seed=43), s) for s in range(50)]
    assert other != draws


def test_top_p_keeps_only_the_nucleus() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    # softmax(LOGITS): token 1 holds ~0.41, token 5 ~0.25: the nucleus for 0.5 is {1, 5}
    assert {sample_token(LOGITS, params, s) for s in range(200)} == {1, 5}


def test_parse_applies_defaults_and_draws_a_seed() -> None:
    params = parse_sampling({}, SamplingDefaults(max_tokens=9, temperature=0.3))
    assert (params.max_tokens, params.temperature, params.top_p) == (9, 0.3, 1.0)
    assert 0 <= params.seed < 2**31
    assert parse_sampling({"stop": "x", "seed": 5}, SamplingDefaults()).stop == ("x",)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_fields_are_named(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        parse_sampling(body, SamplingDefaults())


def test_params_round_trip_through_their_export() -> None:
    params = SamplingParams(max_tokens=3, temperature=0.5, top_p=0.9, stop=("a",), seed=8)
    assert SamplingParams.from_dict(params.to_dict()) == params
