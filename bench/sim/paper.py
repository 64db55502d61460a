"""ServerlessLLM's cluster experiment in shape (issue 6): locality+migration against random
placement and against download-every-time (how Ray Serve and KServe start a cold replica),
on mean and p99 time to first token, over several seeds.

    .venv/bin/python bench/sim/paper.py --json bench/sim/paper.json --out bench/sim/paper-out

Every policy of a seed sees the same trace. Reported per policy: the median over seeds of mean
and p99 latency, and the median over seeds of each ratio to locality+migration (> 1: slower
than locality+migration). The assumptions (bandwidths, token rates) are in paper.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sllm_sim.config import load_config
from sllm_sim.report import plot_cdf, plot_sweep, ratios, run_policies, run_sweep, table

REFERENCE = "locality+migration"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=Path(__file__).with_name("paper.yaml"))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--out", type=Path, help="write latency_cdf.png and latency_vs_rps.png here")
    args = p.parse_args(argv)
    base = load_config(str(args.config))
    started = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    sweep = run_sweep(dataclasses.replace(base, seed=1))
    for seed in range(1, args.seeds + 1):
        results = run_policies(dataclasses.replace(base, seed=seed))
        if seed == 1:
            print(table(results))
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                plot_cdf(args.out / "latency_cdf.png", results)
                plot_sweep(args.out / "latency_vs_rps.png", sweep)
        per_seed.append(
            {
                "seed": seed,
                "results": [r.summary() for r in results],
                "ratios": ratios(results, REFERENCE),
            }
        )
    policies = [r["policy"] for r in per_seed[0]["results"]]
    medians: dict[str, Any] = {}
    for policy in policies:
        rows = [next(r for r in s["results"] if r["policy"] == policy) for s in per_seed]
        entry: dict[str, Any] = {
            "mean_s": statistics.median(r["mean_s"] for r in rows),
            "p99_s": statistics.median(r["p99_s"] for r in rows),
            "p50_s": statistics.median(r["p50_s"] for r in rows),
            "cold_starts": {
                tier: statistics.median(r["cold_starts"][tier] for r in rows)
                for tier in ("dram", "ssd", "store")
            },
            "migrations": statistics.median(r["migrations"] for r in rows),
        }
        if policy != REFERENCE:
            entry["mean_ratio"] = statistics.median(s["ratios"][policy]["mean"] for s in per_seed)
            entry["p99_ratio"] = statistics.median(s["ratios"][policy]["p99"] for s in per_seed)
            entry["mean_ratio_range"] = [
                min(s["ratios"][policy]["mean"] for s in per_seed),
                max(s["ratios"][policy]["mean"] for s in per_seed),
            ]
        medians[policy] = entry
    print(f"\nmedians over {args.seeds} seeds at {base.workload.rps:g} RPS:")
    for policy, m in medians.items():
        line = f"  {policy:<20} mean {m['mean_s']:7.2f} s  p99 {m['p99_s']:7.2f} s"
        if "mean_ratio" in m:
            line += f"  -> x{m['mean_ratio']:.2f} mean, x{m['p99_ratio']:.2f} p99 of {REFERENCE}"
        print(line)
    figures = {
        "config": str(args.config),
        "rps": base.workload.rps,
        "seeds": args.seeds,
        "medians": medians,
        "per_seed": per_seed,
        "sweep_seed1_mean_s": {
            str(rps): {r.policy: r.mean_s for r in rs} for rps, rs in sweep.items()
        },
        "wall_s": time.perf_counter() - started,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
