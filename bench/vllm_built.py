"""Built vLLM engines' cold starts under two node settings, alternating in one run (issue 13).

"Built": the cold start of a model no idle vLLM process holds an engine for. By default the two
settings are one spare vLLM process (``SLLM_VLLM_SPARE=1``, the node's default) and none (``0``).

    .venv/bin/python bench/vllm_built.py --json bench/.data/vllm_built.json
    .venv/bin/python bench/vllm_built.py --vary GLIBC_TUNABLES=glibc.malloc.hugetlb=1, --json F

Two commits against each other: a git worktree of the other commit on the node's PYTHONPATH,
the bench started from a directory outside the repository (``python -m`` puts the working
directory first on the path): the node and its processes then import that worktree's code.

    cd /tmp && /repo/.venv/bin/python /repo/bench/vllm_built.py --vary PYTHONPATH=,/tmp/old --json F

The platform of bench/backends.py (nats-server, gateway, one node with one CPU slot, a pool of
one vLLM process). Each round restarts the node with the round's setting (``--vary
NAME=A,B``: the node's environment variable NAME set to A or to B, empty for unset; the DRAM
and SSD tiers stay, so every load is a DRAM hit), loads SmolLM2, then measures request to
first token of the 1.1B Llama (the idle process holds SmolLM2's engine: the load builds the
1.1B's in the spare, or without a spare frees SmolLM2's first), then of SmolLM2 the same way.
Rounds alternate ABBA: A, B, B, A, A, B, B, A (``--rounds``). Each load's engine (counted when
``built`` from ``dram``), tier and timings are recorded. The peer (``vllm serve`` on the 1.1B,
``--peer-models``) starts eager, compiled and compiled again before the rounds and eager and
compiled again after them: the issue's limits (1/10 of the median eager start, at most 4 s;
1/40 of the fastest compiled start) come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _backends_setup import DATA, MODELS, Platform, build_models, deploy_models
from backends import first_token_s, peer_limits, peer_start_s, stop_on_signal

ABBA = (0, 1, 1, 0)  # indices into the two values of --vary


def load(plat: Platform, fn: str) -> dict[str, Any]:
    """One cold start of ``fn`` from zero replicas, then back to zero and the pool refilled."""
    took = first_token_s(plat.url, fn)
    out = {"first_token_s": took, "engine": plat.last_engine(), "tier": plat.last_tier(),
           "timings": plat.last_timings()}  # fmt: skip
    plat.scale_to_zero(fn)
    plat.wait_quiet()
    return out


def one_round(plat: Platform, name: str, value: str) -> dict[str, Any]:
    """The node restarted with ``name=value``; each model loaded right after the other."""
    plat.restart_with({name: value})
    out: dict[str, Any] = {"value": value, "loadavg": os.getloadavg()}
    load(plat, "smollm2-vllm")  # the idle process then holds SmolLM2's engine
    for model in ("llama1b", "smollm2"):  # each right after the other model's load
        out[model] = load(plat, f"{model}-vllm")
        print(f"{name}={value} {model}: {out[model]['first_token_s']:.2f} s "
              f"engine={out[model]['engine']} tier={out[model]['tier']}", flush=True)  # fmt: skip
    return out


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per model and setting: the built loads' first tokens, their mean and median, B's mean
    less A's, and the medians against the limits of the peer's starts."""
    out: dict[str, Any] = {}
    values = report["values"]
    for name in MODELS:
        loads = [(r["value"], r[name]) for r in report["rounds"] if name in r]
        built = {v: [x["first_token_s"] for got, x in loads if got == v and x["engine"] == "built"
                     and x["tier"] == "dram"] for v in values}  # fmt: skip
        if not all(built.values()):
            continue
        got: dict[str, Any] = {
            v: {"n": len(t), "first_token_s": t, "mean": statistics.mean(t),
                "median": statistics.median(t)} for v, t in built.items()}  # fmt: skip
        got["not_counted"] = len(loads) - sum(map(len, built.values()))  # not built from DRAM
        got["b_less_a_mean_s"] = got[values[1]]["mean"] - got[values[0]]["mean"]
        starts = report["peer"].get(name)
        if starts:
            limits = peer_limits(statistics.median(starts["eager"]), min(starts["compiled"]))
            got["limits_s"] = limits
            for v in values:
                got[v]["met"] = {peer: got[v]["median"] <= lim for peer, lim in limits.items()}
        out[name] = got
    return out


def main() -> int:
    signal.signal(signal.SIGTERM, stop_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--vary", default="SLLM_VLLM_SPARE=1,0", help="NAME=A,B (empty: unset)")
    parser.add_argument("--rounds", type=int, default=8, help="ABBA: A,B,B,A,...")
    parser.add_argument("--peer-models", default="llama1b", help="models the peer starts on")
    args = parser.parse_args()
    hf = build_models()
    peer_models = [m for m in args.peer_models.split(",") if m]
    assert set(peer_models) <= set(MODELS), f"--peer-models must be among {MODELS}"
    var, _, pair = args.vary.partition("=")
    values = pair.split(",")
    assert var and len(values) == 2 and values[0] != values[1], "--vary NAME=A,B"
    order = [values[ABBA[i % len(ABBA)]] for i in range(args.rounds)]
    root = DATA / "run-built"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
                              "vary": var, "values": values, "order": order, "rounds": [],
                              "peer": {m: {"eager": [], "compiled": []} for m in peer_models}}  # fmt: skip

    def peer_visit(modes: tuple[str, ...]) -> None:
        for model in peer_models:
            for mode in modes:
                took = peer_start_s(hf[model], root, compiled=mode != "eager")
                report["peer"][model]["eager" if mode == "eager" else "compiled"].append(took)
                print(f"peer {model} {mode}: {took:.1f} s", flush=True)

    peer_visit(("eager", "compiled", "compiled_warm"))  # the first compiled start compiles
    plat = Platform(root, 1)
    try:
        deploy_models(plat, hf)
        for model in MODELS:  # both checkpoints into the DRAM tier
            load(plat, f"{model}-vllm")
        for value in order:
            report["rounds"].append(one_round(plat, var, value))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        plat.close()
    peer_visit(("eager", "compiled_warm"))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["summary"] = summary(report)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
