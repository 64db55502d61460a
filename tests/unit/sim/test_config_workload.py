"""Simulator config errors name the key; traces are seeded, skewed and as bursty as asked."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from pathlib import Path

import pytest

from sllm.errors import ValidationFailed
from sllm_sim.config import load_config, parse_config
from sllm_sim.workload import build_trace

MODELS = [
    {"name": "opt-6.7b", "bytes": "13.4G"},
    {"name": "opt-30b", "bytes": "60G", "accelerators": 2},
]


def test_defaults_and_units() -> None:
    cfg = parse_config(
        {"models": MODELS, "cluster": {"bandwidth": {"store": "10G"}, "dram": "1Ti"}}
    )
    assert cfg.models[0].bytes == 13_400_000_000 and cfg.models[1].accelerators == 2
    assert cfg.cluster.store_bw == 10e9 and cfg.cluster.dram_bytes == 2**40
    assert cfg.policies == ("locality+migration", "random", "download-every-time")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": MODELS, "clusterr": {}}, r"config.clusterr: unknown key"),
        ({"models": []}, r"models: must be a non-empty list"),
        ({"models": [{"name": "m"}]}, r"models\[0\].bytes: missing"),
        ({"models": [{"name": "m", "bytes": "lots"}]}, r"models\[0\].bytes: expected a size"),
        ({"models": MODELS, "cluster": {"accelerators": 1}}, r"opt-30b needs 2 accelerators"),
        ({"models": MODELS, "policies": ["fastest"]}, r"policies: unknown policy 'fastest'"),
        ({"models": MODELS, "workload": {"arrivals": "weibull"}}, r"workload.arrivals"),
        ({"models": MODELS, "workload": {"rps": -1}}, r"workload.rps: must be in"),
        (
            {
                "models": MODELS,
                "workload": {"input_tokens": {"dist": "uniform", "low": 9, "high": 2}},
            },
            r"workload.input_tokens.high: must be >= low",
        ),
        (
            {"models": MODELS, "cluster": {"bandwidth": {"nvlink": "1G"}}},
            r"cluster.bandwidth.nvlink",
        ),
        ({"models": MODELS, "seed": "x"}, r"seed: must be an integer"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationFailed, match=message):
        parse_config(data)


def test_load_config_reports_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="cannot read simulator config"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ValidationFailed, match="not valid YAML"):
        load_config(str(bad))


def test_trace_is_seeded_and_skewed() -> None:
    cfg = parse_config(
        {"models": MODELS, "workload": {"functions": 100, "rps": 20, "duration": "10m"}}
    )
    a = build_trace(cfg.workload, cfg.models, seed=1)
    b = build_trace(cfg.workload, cfg.models, seed=1)
    c = build_trace(cfg.workload, cfg.models, seed=2)
    assert a == b and a.arrivals != c.arrivals
    assert len(a) == pytest.approx(20 * 600, rel=0.05)
    # Zipf(1) over 100 functions: the top 10 take about 56% of the calls.
    counts = sorted(Counter(a.function).values(), reverse=True)
    assert sum(counts[:10]) / len(a) == pytest.approx(0.56, abs=0.05)
    assert {f.model.name for f in a.functions} == {"opt-6.7b", "opt-30b"}


@pytest.mark.parametrize(("arrivals", "cv"), [("poisson", 1.0), ("gamma", 4.0), ("gamma", 0.5)])
def test_arrivals_have_the_rate_and_burstiness_asked(arrivals: str, cv: float) -> None:
    cfg = parse_config(
        {
            "models": MODELS,
            "workload": {"rps": 50, "duration": "20m", "arrivals": arrivals, "cv": cv},
        }
    )
    tr = build_trace(cfg.workload, cfg.models, seed=3)
    gaps = [b - a for a, b in zip(tr.arrivals, tr.arrivals[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.15)


def test_token_lengths_follow_their_distribution() -> None:
    cfg = parse_config(
        {
            "models": MODELS,
            "workload": {
                "rps": 50,
                "duration": "10m",
                "input_tokens": {"dist": "lognormal", "mean": 400, "sigma": 0.6},
                "output_tokens": {"dist": "uniform", "low": 10, "high": 20},
            },
        }
    )
    tr = build_trace(cfg.workload, cfg.models, seed=5)
    assert statistics.fmean(tr.tokens_in) == pytest.approx(400, rel=0.05)
    assert min(tr.tokens_out) == 10 and max(tr.tokens_out) == 20
    fixed = dataclasses.replace(cfg.workload, output_tokens=cfg.workload.input_tokens.__class__())
    assert set(build_trace(fixed, cfg.models, seed=5).tokens_out) == {128}
