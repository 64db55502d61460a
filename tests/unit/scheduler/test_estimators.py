"""Learned estimators: least-squares resume model and EWMA bandwidths."""

from __future__ import annotations

import random

import pytest

from gateway.scheduler.estimators import BandwidthModel, MigrationModel, MigrationModels
from gateway.scheduler.types import MigrationFit
from sllm.errors import InvalidInput


@pytest.mark.parametrize(("a", "b"), [(2e-3, 0.8), (5e-5, 3.0), (0.01, 0.0)])
def test_fit_recovers_a_and_b_from_synthetic_resumes(a: float, b: float) -> None:
    rng = random.Random(42)
    model = MigrationModel()
    for _ in range(400):
        tokens = rng.randint(10, 4000)
        model.observe(tokens, a * tokens + b + rng.gauss(0, 0.01))
    fit = model.fit()
    assert fit.a == pytest.approx(a, rel=0.05, abs=2e-5)
    assert fit.b == pytest.approx(b, abs=0.02)


def test_exact_data_is_fitted_exactly() -> None:
    model = MigrationModel()
    for tokens in (100, 200, 400):
        model.observe(tokens, 0.002 * tokens + 0.5)
    assert model.fit().a == pytest.approx(0.002) and model.fit().b == pytest.approx(0.5)


def test_prior_before_data_and_slope_kept_until_identifiable() -> None:
    prior = MigrationFit(a=1e-3, b=1.0)
    model = MigrationModel(prior=prior)
    assert model.fit() == prior
    model.observe(1000, 4.0)  # one point: keep the prior slope, fit the intercept
    assert model.fit() == MigrationFit(a=1e-3, b=pytest.approx(3.0))
    model.observe(1000, 2.0)  # same length again: still no slope information
    assert model.fit().a == 1e-3 and model.fit().b == pytest.approx(2.0)


def test_fit_is_never_negative() -> None:
    model = MigrationModel()
    for tokens, seconds in ((100, 5.0), (1000, 1.0), (2000, 0.5)):
        model.observe(tokens, seconds)  # faster with more tokens: noise, not physics
    fit = model.fit()
    assert fit.a == 0.0 and fit.b == pytest.approx(6.5 / 3)
    model = MigrationModel()
    for tokens, seconds in ((100, 0.1), (200, 1.0)):
        model.observe(tokens, seconds)  # would need b < 0: refit through the origin
    assert model.fit().b == 0.0 and model.fit().a > 0


def test_models_are_per_checkpoint() -> None:
    models = MigrationModels(prior=MigrationFit(1e-3, 1.0))
    for tokens in (10, 20, 30):
        models.observe("big", tokens, 0.1 * tokens)
    fits = models.fits()
    assert list(fits) == ["big"] and fits["big"].a == pytest.approx(0.1)


@pytest.mark.parametrize(("tokens", "seconds"), [(-1, 1.0), (1, -1.0), (1, float("nan"))])
def test_bad_observations_are_rejected(tokens: int, seconds: float) -> None:
    with pytest.raises(InvalidInput, match="migration"):
        MigrationModel().observe(tokens, seconds)


def test_bandwidth_seed_then_ewma() -> None:
    bw = BandwidthModel(alpha=0.5)
    assert bw.get("n1", "ssd") == 2e9  # default before anything is known
    bw.seed("n1", "ssd", 1e9)
    assert bw.get("n1", "ssd") == 1e9
    bw.observe("n1", "ssd", 3 * 10**9, 1.0)  # 3 GB/s sample
    assert bw.get("n1", "ssd") == pytest.approx(2e9)
    bw.seed("n1", "ssd", 5e9)  # a later probe does not override observations
    assert bw.get("n1", "ssd") == pytest.approx(2e9)
    bw.observe("n1", "ssd", 0, 1.0)  # nothing transferred: ignored
    bw.observe("n1", "dram", 8 * 10**9, 1.0)  # first sample of a tier is taken as is
    assert bw.table() == {"n1": {"ssd": pytest.approx(2e9), "dram": 8e9}}
    with pytest.raises(InvalidInput, match="alpha"):
        BandwidthModel(alpha=0)
