"""Run every policy on the same trace(s) and report: a text table, JSON, and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sllm_sim.config import SimConfig
from sllm_sim.engine import Simulation
from sllm_sim.results import SimResult
from sllm_sim.workload import build_trace


def run_policies(config: SimConfig, rps: float | None = None) -> list[SimResult]:
    """Every configured policy on one trace (the same calls for each: a fair comparison)."""
    if rps is not None:
        config = dataclasses.replace(config, workload=dataclasses.replace(config.workload, rps=rps))
    trace = build_trace(config.workload, config.models, config.seed)
    return [Simulation(config, trace, policy).run() for policy in config.policies]


def run_sweep(config: SimConfig) -> dict[float, list[SimResult]]:
    """rps -> results per policy, for each rate of ``rps_sweep``."""
    return {rps: run_policies(config, rps) for rps in config.rps_sweep}


def table(results: Sequence[SimResult]) -> str:
    """One row per policy: TTFT mean/p50/p99, cold starts by tier, migrations."""
    head = (
        f"{'policy':<22}{'requests':>9}{'mean s':>9}{'p50 s':>9}{'p99 s':>9}"
        f"{'dram':>7}{'ssd':>7}{'store':>7}{'migr':>6}{'evict':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        c = s["cold_starts"]
        lines.append(
            f"{r.policy:<22}{r.requests:>9}{s['mean_s']:>9.2f}{s['p50_s']:>9.2f}"
            f"{s['p99_s']:>9.2f}{c['dram']:>7}{c['ssd']:>7}{c['store']:>7}"
            f"{r.migrations:>6}{r.evictions:>7}"
        )
    return "\n".join(lines)


def ratios(results: Sequence[SimResult], reference: str) -> dict[str, dict[str, float]]:
    """For each other policy: its mean and p99 latency divided by ``reference``'s."""
    by = {r.policy: r.summary() for r in results}
    if reference not in by:
        return {}
    ref = by[reference]
    out: dict[str, dict[str, float]] = {}
    for policy, s in by.items():
        if policy == reference:
            continue
        out[policy] = {
            "mean": s["mean_s"] / ref["mean_s"] if ref["mean_s"] > 0 else math.nan,
            "p99": s["p99_s"] / ref["p99_s"] if ref["p99_s"] > 0 else math.nan,
        }
    return out


def write_outputs(
    out_dir: Path,
    config: SimConfig,
    results: Sequence[SimResult],
    sweep: dict[float, list[SimResult]],
    plots: bool = True,
) -> dict[str, Any]:
    """summary.json, latency_cdf.png and (with a sweep) latency_vs_rps.png under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "seed": config.seed,
        "rps": config.workload.rps,
        "results": [r.summary() for r in results],
        "ratios_vs_locality+migration": ratios(results, "locality+migration"),
        "sweep": {str(rps): [r.summary() for r in rs] for rps, rs in sweep.items()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if plots:
        plot_cdf(out_dir / "latency_cdf.png", results)
        if sweep:
            plot_sweep(out_dir / "latency_vs_rps.png", sweep)
    return summary


def plot_cdf(path: Path, results: Sequence[SimResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        lat = r.latencies
        if not lat:
            continue
        # Plot at most 2,000 points: enough for a smooth CDF of 360,000 requests.
        step = max(1, len(lat) // 2000)
        xs = [*lat[::step], lat[-1]]
        ys = [*(min(1.0, (i * step + 1) / len(lat)) for i in range(len(xs) - 1)), 1.0]
        ax.plot([max(x, 1e-3) for x in xs], ys, label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency CDF at {results[0].rps:g} RPS" if results else "Latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, sweep: dict[float, list[SimResult]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(sweep)
    policies = [r.policy for r in sweep[rates[0]]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy in policies:
        means = [next(r.mean_s for r in sweep[rps] if r.policy == policy) for rps in rates]
        ax.plot(rates, means, marker="o", label=policy)
    ax.set_xlabel("requests per second")
    ax.set_ylabel("mean time to first token (s)")
    ax.set_yscale("log")
    ax.set_title("Mean latency against load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
