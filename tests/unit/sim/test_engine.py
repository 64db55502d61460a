"""The simulator on scripted timelines: tiers, keep-alive, migration, determinism."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sllm_sim.config import ClusterConfig, ModelConfig, SimConfig, parse_config
from sllm_sim.engine import Simulation
from sllm_sim.report import run_policies
from sllm_sim.workload import SimFunction, Trace

GB = 10**9
# Store 1 GB/s, SSD 5 GB/s, DRAM 10 GB/s, 1 s to start an instance.
CLUSTER = ClusterConfig(
    nodes=1,
    accelerators=1,
    dram_bytes=100 * GB,
    ssd_bytes=1000 * GB,
    dram_bw=10e9,
    ssd_bw=5e9,
    store_bw=1e9,
    startup_s=1.0,
)
BIG = ModelConfig("big", 20 * GB, prefill_tps=1000.0, decode_tps=10.0)
SMALL = ModelConfig("small", 2 * GB, prefill_tps=1000.0, decode_tps=10.0)


def config(
    cluster: ClusterConfig = CLUSTER, keep_alive: float = 5.0, concurrency: int = 1
) -> SimConfig:
    base = parse_config({"models": [{"name": "m", "bytes": 1}]})
    return dataclasses.replace(
        base,
        cluster=cluster,
        models=(BIG, SMALL),
        workload=dataclasses.replace(
            base.workload, keep_alive_s=keep_alive, max_concurrency=concurrency, max_instances=2
        ),
    )


def trace(calls: list[tuple[float, int, int, int]], models: tuple[ModelConfig, ...]) -> Trace:
    """calls: (arrival s, function index, tokens in, tokens out); function i serves models[i]."""
    fns = tuple(SimFunction(f"fn-{i}", f"ck-{i}", m) for i, m in enumerate(models))
    return Trace(
        functions=fns,
        arrivals=[c[0] for c in calls],
        function=[c[1] for c in calls],
        tokens_in=[c[2] for c in calls],
        tokens_out=[c[3] for c in calls],
    )


def test_second_cold_start_reads_dram_and_baseline_reads_store() -> None:
    # 100 tokens in = 0.1 s prefill. First load from the store: 20 s + 1 s start.
    tr = trace([(0.0, 0, 100, 10), (100.0, 0, 100, 10)], (BIG,))
    cfg = config()
    for policy in ("locality", "random", "locality+migration"):
        sim = Simulation(cfg, tr, policy)
        result = sim.run()
        assert result.latencies == pytest.approx([2 + 1 + 0.1, 20 + 1 + 0.1])
        assert result.loads == {"dram": 1, "ssd": 0, "store": 1}
    base = Simulation(cfg, tr, "download-every-time").run()
    assert base.latencies == pytest.approx([21.1, 21.1])
    assert base.loads["store"] == 2


def test_keep_alive_serves_warm_and_queues_behind_busy_instance() -> None:
    # Second call inside keep-alive: warm (prefill only). Third arrives while the only
    # instance is busy (max_concurrency 1, one device): it waits for the first to finish.
    tr = trace([(0.0, 0, 100, 10), (22.0, 0, 100, 100), (23.0, 0, 100, 10)], (BIG,))
    result = Simulation(config(keep_alive=30.0), tr, "locality").run()
    # call 1: first token 21.1, done 22.1; call 2 waits for it, first token 22.2, done 32.2;
    # call 3 starts at 32.2, first token 32.3.
    assert result.latencies == pytest.approx([0.2, 9.3, 21.1])
    assert sum(result.loads.values()) == 1


def test_migration_frees_the_device_that_caches_the_model() -> None:
    # 2 nodes x 2 devices. A (big, 20 GB) runs long on node 0; B (small) lands beside it at
    # t=25 (A's load is done, node 0 is first with room). At t=50 a second A call needs an
    # instance: node 0 caches A in DRAM but is full. Moving B to node 1 (store 2 s + 1 s,
    # resume ~0.6 s) then loading A from DRAM (2 s + 1 s) beats node 1 from the store (21 s).
    cluster = dataclasses.replace(CLUSTER, nodes=2, accelerators=2)
    calls = [(0.0, 0, 100, 3000), (25.0, 1, 100, 3000), (50.0, 0, 100, 10)]
    tr = trace(calls, (BIG, SMALL))
    cfg = config(cluster)
    moved = Simulation(cfg, tr, "locality+migration")
    result = moved.run()
    assert result.migrations == 1
    stayed = Simulation(cfg, tr, "locality")
    plain = stayed.run()
    assert plain.migrations == 0
    a2_moved = moved.first[2] - 50.0
    a2_plain = stayed.first[2] - 50.0
    assert a2_plain == pytest.approx(21.1)
    assert 6.0 < a2_moved < 8.0
    # B's request was moved, not lost: it finishes one stall (0.2 s) later.
    assert moved.done[1] == pytest.approx(stayed.done[1] + cfg.migration.stall_s)
    assert moved.fits and next(iter(moved.fits)) == "ck-1"


def test_no_capacity_waits_for_a_free_device() -> None:
    # One device, reclaiming idle instances off: the second function waits for keep-alive.
    cluster = dataclasses.replace(CLUSTER, reclaim_idle=False)
    tr = trace([(0.0, 0, 100, 10), (22.0, 1, 100, 10)], (BIG, SMALL))
    sim = Simulation(config(cluster, keep_alive=10.0), tr, "locality")
    result = sim.run()
    # A goes idle at 22.1, stops at 32.1; B loads 2 s + 1 s: first token at 35.2.
    assert sim.first[1] == pytest.approx(35.2)
    assert result.no_capacity >= 1
    # With reclaiming on, A is stopped as soon as it is idle (22.1) and B starts at once.
    sim = Simulation(config(keep_alive=10.0), tr, "locality")
    assert sim.run().evictions == 1 and sim.first[1] == pytest.approx(22.1 + 3.1)


SIM_YAML = """\
seed: 7
cluster: {nodes: 3, accelerators: 2, dram: 40G, ssd: 200G,
          bandwidth: {dram: 10G, ssd: 2G, store: 500M}}
models:
  - {name: small, bytes: 4G}
  - {name: big, bytes: 16G, accelerators: 2}
workload: {functions: 12, rps: 0.5, duration: 10m, arrivals: gamma, cv: 3,
           input_tokens: {dist: lognormal, mean: 300, sigma: 0.5},
           output_tokens: {dist: uniform, low: 8, high: 64}, keep_alive: 30s}
policies: [locality+migration, random, download-every-time]
rps_sweep: [0.25, 0.5]
"""


def _stable(summary: dict[str, object]) -> list[object]:
    """The simulated figures of a summary (not the wall-clock timings)."""
    out = []
    for r in summary["results"]:  # type: ignore[attr-defined]
        out.append({k: v for k, v in r.items() if "ms" not in k and k != "wall_s"})
    return out


def test_same_seed_same_results_across_processes(tmp_path: Path) -> None:
    cfg_file = tmp_path / "sim.yaml"
    cfg_file.write_text(SIM_YAML)
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sllm_cli.main",
                "sim",
                "--config",
                str(cfg_file),
                "--out",
                str(tmp_path / hash_seed),
                "--json",
                "--no-plots",
                "--no-sweep",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        runs.append(_stable(json.loads(out.stdout)))
    assert runs[0] == runs[1]
    other = parse_config(__import__("yaml").safe_load(SIM_YAML.replace("seed: 7", "seed: 8")))
    assert [r.summary()["mean_s"] for r in run_policies(other)] != [
        r["mean_s"]
        for r in runs[0]  # type: ignore[index]
    ]


def test_cli_writes_table_summary_and_plots(tmp_path: Path) -> None:
    from sllm_cli.app import run

    cfg_file = tmp_path / "sim.yaml"
    cfg_file.write_text(SIM_YAML)
    assert run(["sim", "--config", str(cfg_file), "--out", str(tmp_path / "out")]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"summary.json", "latency_cdf.png", "latency_vs_rps.png"}
    assert (tmp_path / "out" / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["policy"] for r in summary["results"]] == [
        "locality+migration",
        "random",
        "download-every-time",
    ]
    assert set(summary["sweep"]) == {"0.25", "0.5"}
    assert summary["ratios_vs_locality+migration"]["download-every-time"]["mean"] > 1


@pytest.mark.parametrize(
    "policy", ["locality+migration", "random", "least-loaded", "download-every-time"]
)
def test_busy_cluster_never_double_books_and_finishes_every_request(policy: str) -> None:
    # A crowded, bursty cluster: any device booked twice raises in SimNode.take.
    cfg = parse_config(
        {
            "seed": 3,
            "cluster": {"nodes": 6, "accelerators": 2, "dram": "30G", "ssd": "100G"},
            "models": [
                {"name": "a", "bytes": "4G"},
                {"name": "b", "bytes": "12G", "accelerators": 2},
            ],
            "workload": {
                "functions": 40,
                "rps": 2,
                "duration": "5m",
                "arrivals": "gamma",
                "cv": 4,
                "keep_alive": "20s",
                "max_concurrency": 2,
            },
        }
    )
    from sllm_sim.workload import build_trace

    tr = build_trace(cfg.workload, cfg.models, cfg.seed)
    sim = Simulation(cfg, tr, policy)
    result = sim.run()
    assert all(math.isfinite(d) for d in sim.done) and result.latencies[0] >= 0
    # Every instance stopped after its keep-alive: every device is free again, once.
    for node in sim.cluster.nodes.values():
        assert sorted(node.free) == sorted(node.devices) and not node.instances
    assert sum(result.loads.values()) + result.migrations >= 1
