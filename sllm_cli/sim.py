"""`sllm sim --config FILE`: run the cluster simulator and print the comparison table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sllm.errors import InvalidInput

Groups = dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    p = root.add_parser(
        "sim",
        help="simulate a cluster under a workload with each scheduling policy",
        description="Run the discrete-event cluster simulator (the gateway's own scheduler on "
        "simulated nodes) for every policy in the config, print a table (time-to-first-token "
        "mean/p50/p99, cold starts by tier, migrations) and write summary.json plus PNG plots "
        "(latency CDF per policy; mean latency against RPS when the config has rps_sweep).",
    )
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML config")
    p.add_argument("--out", type=Path, default=Path("sim-out"), help="output directory")
    p.add_argument("--policy", action="append", help="run only this policy (repeatable)")
    p.add_argument("--rps", type=float, help="override workload.rps")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--no-sweep", action="store_true", help="skip the rps_sweep runs")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files")
    p.add_argument("--json", action="store_true", help="print summary.json instead of a table")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from sllm.settings import POLICIES
    from sllm_sim.config import load_config
    from sllm_sim.report import run_policies, run_sweep, table, write_outputs

    config = load_config(str(args.config))
    if args.policy:
        unknown = [p for p in args.policy if p not in POLICIES]
        if unknown:
            raise InvalidInput(f"--policy: unknown {unknown[0]!r}; choose from {POLICIES}")
        config = dataclasses.replace(config, policies=tuple(args.policy))
    if args.rps is not None:
        if args.rps <= 0:
            raise InvalidInput(f"--rps must be > 0, got {args.rps}")
        config = dataclasses.replace(
            config, workload=dataclasses.replace(config.workload, rps=args.rps)
        )
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    if args.no_sweep:
        config = dataclasses.replace(config, rps_sweep=())
    results = run_policies(config)
    sweep = run_sweep(config)
    summary = write_outputs(args.out, config, results, sweep, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(table(results))
    for policy, r in summary["ratios_vs_locality+migration"].items():
        print(f"{policy}: mean x{r['mean']:.2f}, p99 x{r['p99']:.2f} of locality+migration")
    print(f"wrote {args.out}/summary.json" + ("" if args.no_plots else " and PNG plots"))
    return 0
