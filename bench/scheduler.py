"""Scheduler scale benchmark (issue 6): decisions on 1,000 nodes x 8 accelerators and 10,000
functions (target: under 10 ms each), and one simulated hour at 100 RPS on that cluster
(target: under 2 minutes of wall time).

    .venv/bin/python bench/scheduler.py --json bench/scheduler.json

The decision cluster is synthetic and seeded: every node caches ~15 checkpoints in DRAM and
~100 on SSD (drawn by Zipf popularity), a share of its devices runs instances with tokens in
flight, and some nodes have loads queued. Two states are measured: ``busy`` (60% of devices
taken) and ``full`` (all but ~1% taken, so locality+migration weighs many victims). Timings are
place() alone on a prepared snapshot, and snapshot_from_heartbeats() from 1,000 heartbeats
(what the gateway rebuilds when nodes report).

The gateway path (``--gateway-only`` runs just this part) times one placement as the gateway
asks for it (``PolicyScheduler.place``: snapshot, then decide) with 1% of the nodes reporting
between decisions and the instances with requests in flight protected: the full build of
every decision that the gateway did before (protected instances marked in copied heartbeats,
then ``snapshot_from_heartbeats``) against today's ``SnapshotCache``; both decide the same.

The target (every decision under 10 ms) is judged on the true worst case (``worst_case``):
the largest single sample of what the gateway runs per decision, the snapshot update included
(``gateway_path.*.snapshot_cache``), beside the largest sample of ``place()`` alone; no
fastest-of-passes filtering. The load average is recorded with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Running `python bench/scheduler.py` puts bench/ first on sys.path, where bench/gateway.py
# would shadow the gateway package: drop it so the installed packages are imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from gateway.placement import PolicyScheduler  # noqa: E402
from gateway.scheduler.policies import place  # noqa: E402
from gateway.scheduler.snapshot import SnapshotCache, snapshot_from_heartbeats  # noqa: E402
from gateway.scheduler.types import ClusterSnapshot, Placement, PlacementRequest  # noqa: E402
from sllm.messages import CacheEntryState, DeviceState, InstanceState, NodeHeartbeat  # noqa: E402
from sllm.settings import POLICIES  # noqa: E402
from sllm_sim.config import load_config  # noqa: E402
from sllm_sim.engine import Simulation  # noqa: E402
from sllm_sim.workload import build_trace  # noqa: E402

SIZES = (13_400_000_000, 26_000_000_000, 60_000_000_000)  # OPT-6.7B/13B/30B fp16
SCALE_CONFIG = Path(__file__).parent / "sim" / "scale.yaml"


def synthetic_cluster(
    nodes: int, accelerators: int, functions: int, busy: float, seed: int
) -> tuple[dict[str, NodeHeartbeat], dict[str, tuple[str, int]], list[float]]:
    """Heartbeats of a cluster in steady state, the registry's function table, popularity."""
    rng = random.Random(seed)
    table = {
        f"fn-{i:05d}": (f"checkpoints/fn-{i:05d}/{i:016x}", SIZES[i % 3]) for i in range(functions)
    }
    names = list(table)
    cum = list(itertools.accumulate(1.0 / r for r in range(1, functions + 1)))
    heartbeats: dict[str, NodeHeartbeat] = {}
    for n in range(nodes):
        node_id = f"node-{n:04d}"
        dram = {names[i] for i in rng.choices(range(functions), cum_weights=cum, k=15)}
        ssd = dram | {names[i] for i in rng.choices(range(functions), cum_weights=cum, k=100)}
        devices: list[DeviceState] = []
        instances: list[InstanceState] = []
        for d in range(accelerators):
            device = f"cuda:{d}"
            if rng.random() < busy:
                fn = rng.choice(sorted(dram))
                iid = f"{node_id}-i{d}"
                devices.append(DeviceState(device, "cuda", 80 * 10**9, iid))
                instances.append(
                    InstanceState(
                        iid,
                        fn,
                        device,
                        "ready",
                        "http://10.0.0.1:9000",
                        rng.randint(0, 4),
                        rng.randint(0, 4000),
                        rng.randint(0, 500),
                    )
                )
            else:
                devices.append(DeviceState(device, "cuda", 80 * 10**9, None))
        heartbeats[node_id] = NodeHeartbeat(
            node_id=node_id,
            seq=1,
            devices=devices,
            instances=instances,
            cache={
                "dram": [CacheEntryState(table[f][0], table[f][1]) for f in sorted(dram)],
                "ssd": [CacheEntryState(table[f][0], table[f][1]) for f in sorted(ssd)],
            },
            bandwidths={"dram": 20e9, "ssd": 5e9, "store": 1.25e9},
            load_queue_s=rng.choice((0.0, 0.0, 0.0, 0.0, rng.uniform(0, 30))),
        )
    return heartbeats, table, cum


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": statistics.median(s) * 1e3,
        "p99_ms": s[int(0.99 * (len(s) - 1))] * 1e3,
        "max_ms": s[-1] * 1e3,
    }


def _timed_place(
    snap: ClusterSnapshot, requests: list[PlacementRequest], policy: str, passes: int
) -> tuple[list[float], list[float], dict[str, int]]:
    """Every sample, each request's fastest of ``passes`` passes (what the code costs once
    other processes' preemptions are filtered out), and the outcomes."""
    every: list[float] = []
    fastest = [float("inf")] * len(requests)
    outcomes: dict[str, int] = {}
    for p in range(passes):
        for i, req in enumerate(requests):
            t0 = time.perf_counter()
            result = place(snap, req, policy, rng_seed=i)
            dt = time.perf_counter() - t0
            every.append(dt)
            fastest[i] = min(fastest[i], dt)
            if p == 0:
                kind = type(result).__name__
                if isinstance(result, Placement) and result.migration is not None:
                    kind = "Migration"
                outcomes[kind] = outcomes.get(kind, 0) + 1
    return every, fastest, outcomes


def bench_decisions(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for state, busy in (("busy", 0.6), ("full", 0.99)):
        hbs, table, cum = synthetic_cluster(args.nodes, args.accelerators, args.functions, busy, 1)
        build_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            snap = snapshot_from_heartbeats(hbs, functions=table)
            build_s.append(time.perf_counter() - t0)
        # The gateway's incremental path: 1% of the nodes sent a new heartbeat since.
        cache = SnapshotCache()
        cache.snapshot(hbs, functions=table)
        update_s = []
        ids = list(hbs)
        for k in range(10):
            for node_id in ids[k * 10 : k * 10 + 10]:
                hbs[node_id] = dataclasses.replace(hbs[node_id], seq=hbs[node_id].seq + 1)
            t0 = time.perf_counter()
            cache.snapshot(hbs, functions=table)
            update_s.append(time.perf_counter() - t0)
        rng = random.Random(2)
        names = list(table)
        picks = rng.choices(range(len(names)), cum_weights=cum, k=args.decisions)
        requests = [PlacementRequest(names[i], *table[names[i]]) for i in picks]
        per_policy: dict[str, Any] = {}
        for policy in POLICIES:
            every, fastest, outcomes = _timed_place(snap, requests, policy, args.passes)
            per_policy[policy] = {
                "all_samples": _ms(every),
                "fastest_of_passes": _ms(fastest),
                "outcomes": outcomes,
            }
        out[state] = {
            "busy_fraction": busy,
            "nodes_with_room": len(snap.free),
            "snapshot_from_heartbeats": _ms(build_s),
            "snapshot_cache_1pct_changed": _ms(update_s),
            "place": per_policy,
        }
    return out


def _protect_by_copy(hb: NodeHeartbeat, protected: set[str]) -> NodeHeartbeat:
    """The gateway's former way of protecting instances (gateway/placement.py ``_protect`` up
    to commit 9acadaa): a copy of the heartbeat with them shown busy, every decision."""
    instances = [
        dataclasses.replace(i, in_flight=max(1, i.in_flight)) if i.instance_id in protected else i
        for i in hb.instances
    ]
    return dataclasses.replace(hb, instances=instances)


def bench_gateway_path(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    policy = "locality+migration"
    for state, busy in (("busy", 0.6), ("full", 0.99)):
        hbs, table, cum = synthetic_cluster(args.nodes, args.accelerators, args.functions, busy, 1)
        protected = {i.instance_id for hb in hbs.values() for i in hb.instances if i.in_flight}
        rng = random.Random(3)
        names = list(table)
        picks = rng.choices(range(len(names)), cum_weights=cum, k=args.gateway_decisions)
        requests = [PlacementRequest(names[i], *table[names[i]]) for i in picks]
        scheduler = PolicyScheduler(policy)
        scheduler.place(list(hbs.values()), set(), table, requests[0], protected=protected)
        ids = list(hbs)
        step = max(1, len(ids) // 100)
        before_s: list[float] = []
        after_s: list[float] = []
        for k, req in enumerate(requests):
            for j in range(k * step, k * step + step):  # 1% of the nodes reported since
                node_id = ids[j % len(ids)]
                hbs[node_id] = dataclasses.replace(hbs[node_id], seq=hbs[node_id].seq + 1)
            beats = list(hbs.values())
            t0 = time.perf_counter()
            by_node = {hb.node_id: _protect_by_copy(hb, protected) for hb in beats}
            snap = snapshot_from_heartbeats(
                by_node,
                {},
                functions=table,
                migration=scheduler.migration.fits(),
                reclaim_idle=True,
            )
            want = place(snap, req, policy)
            before_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = scheduler.place(beats, set(), table, req, protected=protected)
            after_s.append(time.perf_counter() - t0)
            if got != want:
                raise AssertionError(f"cached and full snapshots decided differently: {got} {want}")
        out[state] = {
            "policy": policy,
            "protected_instances": len(protected),
            "decisions": len(requests),
            "full_build_per_decision": _ms(before_s),
            "snapshot_cache": _ms(after_s),
        }
    return out


def bench_sim_hour(config_path: Path) -> dict[str, Any]:
    config = load_config(str(config_path))
    t0 = time.perf_counter()
    trace = build_trace(config.workload, config.models, config.seed)
    trace_s = time.perf_counter() - t0
    result = Simulation(config, trace, config.policies[0]).run()
    total = time.perf_counter() - t0
    return {
        "config": str(config_path),
        "nodes": config.cluster.nodes,
        "accelerators": config.cluster.accelerators,
        "functions": config.workload.functions,
        "rps": config.workload.rps,
        "simulated_s": config.workload.duration_s,
        "trace_s": trace_s,
        "wall_s": total,
        "summary": result.summary(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--accelerators", type=int, default=8)
    p.add_argument("--functions", type=int, default=10_000)
    p.add_argument("--decisions", type=int, default=1000, help="requests per policy and pass")
    p.add_argument("--passes", type=int, default=5, help="passes over the requests")
    p.add_argument("--sim-config", type=Path, default=SCALE_CONFIG)
    p.add_argument("--skip-sim", action="store_true", help="decisions only")
    p.add_argument("--gateway-decisions", type=int, default=30, help="gateway-path decisions")
    p.add_argument("--gateway-only", action="store_true", help="the gateway path alone")
    args = p.parse_args(argv)
    if args.gateway_only:
        return _gateway_only(args)
    figures: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}, {_cpus()} CPUs",
        "cluster": {
            "nodes": args.nodes,
            "accelerators": args.accelerators,
            "functions": args.functions,
        },
        "decisions": bench_decisions(args),
    }
    for state, d in figures["decisions"].items():
        for policy, f in d["place"].items():
            a, b = f["all_samples"], f["fastest_of_passes"]
            print(
                f"{state:>4} {policy:<20} all: p50 {a['p50_ms']:.3f} p99 {a['p99_ms']:.3f} "
                f"max {a['max_ms']:.3f} ms | fastest: p99 {b['p99_ms']:.3f} max "
                f"{b['max_ms']:.3f} ms"
            )
        print(
            f"{state:>4} snapshot_from_heartbeats p50 {d['snapshot_from_heartbeats']['p50_ms']:.1f}"
            f" ms; SnapshotCache (1% changed) p50 "
            f"{d['snapshot_cache_1pct_changed']['p50_ms']:.1f} ms"
        )
    figures["gateway_path"] = bench_gateway_path(args)
    _print_gateway(figures["gateway_path"])
    figures["worst_case"] = worst_case(figures)
    print(json.dumps(figures["worst_case"]))
    if not args.skip_sim:
        figures["sim_hour"] = bench_sim_hour(args.sim_config)
        h = figures["sim_hour"]
        print(
            f"simulated hour: {h['summary']['requests']} requests, "
            f"{h['summary']['decisions']} decisions, wall {h['wall_s']:.1f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


TARGET_MS = 10.0


def worst_case(figures: dict[str, Any]) -> dict[str, Any]:
    """The largest single sample of a whole decision (snapshot update + place, as the gateway
    runs it) and of place() alone, over every state and policy, against the 10 ms target."""
    import os

    gateway = max(g["snapshot_cache"]["max_ms"] for g in figures["gateway_path"].values())
    out: dict[str, Any] = {
        "decision_with_snapshot_max_ms": gateway,
        "target_ms": TARGET_MS,
        "met": gateway < TARGET_MS,
        "load_average": os.getloadavg()[0],
    }
    if "decisions" in figures:
        out["place_alone_max_ms"] = max(
            f["all_samples"]["max_ms"]
            for d in figures["decisions"].values()
            for f in d["place"].values()
        )
    return out


def _gateway_only(args: argparse.Namespace) -> int:
    figures = {"gateway_path": bench_gateway_path(args)}
    _print_gateway(figures["gateway_path"])
    figures["worst_case"] = worst_case(figures)
    print(json.dumps(figures["worst_case"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return 0


def _print_gateway(path: dict[str, Any]) -> None:
    for state, g in path.items():
        a, b = g["full_build_per_decision"], g["snapshot_cache"]
        print(
            f"{state:>4} gateway place(): full build p50 {a['p50_ms']:.1f} max {a['max_ms']:.1f}"
            f" ms; SnapshotCache p50 {b['p50_ms']:.1f} max {b['max_ms']:.1f} ms"
            f" ({g['protected_instances']} protected instances, {g['decisions']} decisions)"
        )


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
