"""The HA control plane at scale (issue 16): 2 gateways, 3 NATS servers, 4 nodes, each gateway
and node on its own host (a network namespace joined to a bridge by a veth pair shaped by tc,
``sllm_cli.netns``).

    .venv/bin/python bench/cluster.py --json bench/.data/cluster.json    # as root

Real parts throughout (``tests.cluster.LocalCluster``): a NATS cluster of three with JetStream
replicas 3 on the bridge, `sllm gateway start` twice, `sllm node start` four times, a tiny
random Llama in a local-directory store. Two figures, each beside what limits it, measured in
the same run:

- ``decisions``: how long the leader takes to decide a wake. A function with no instance gets
  one request, sent in turn to the leader and to the other gateway (ABBA); the time from the
  request to the start record the leader writes to the scale bucket just before it sends the
  load command (``gateway.scale_state``; seen by a watch on the bucket). Its floor: the two
  replicated KV writes the leader waits for before the load goes out (the function's desired
  count, then the start record), timed here on a bucket of the same kind; a request at the
  follower adds its report's hop. Beside it, the leader's own control-loop round
  (``sllm_control_tick_seconds``: gather, decide and place every function).
- ``throughput``: requests per second through the gateways (clients spread over both) against
  the same clients calling the four instances directly (with their secrets, heard from the
  nodes' heartbeats as a gateway hears them), in ABBA order. The direct rate is the limit: the
  instances' generation on this machine's cores.

Needs root and iproute2 (``ip``, ``tc``). The machine's state (load average, cores) goes with
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

# Run as a script, this folder comes first on sys.path, and bench/gateway.py would shadow the
# gateway package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from gateway.scale_state import SCALE_BUCKET, START  # noqa: E402
from sllm.bus import KeyValue, Message  # noqa: E402
from sllm.instance_auth import auth_header  # noqa: E402
from sllm.messages import HEARTBEATS, NodeHeartbeat, decode_as  # noqa: E402
from sllm.nats_bus import NatsBus  # noqa: E402
from sllm_cli import netns  # noqa: E402
from sllm_cli.servers import nats_client_env  # noqa: E402
from tests.chaos import PROMPTS, body  # noqa: E402
from tests.cluster import AUTH, LocalCluster  # noqa: E402

GATEWAYS = ("gw-0", "gw-1")
NODES = ("node-0", "node-1", "node-2", "node-3")
KEY = "checkpoints/tiny/cluster-bench"
SETTINGS = {
    "SLLM_HEARTBEAT_INTERVAL": "0.5s",
    "SLLM_NODE_TIMEOUT": "10s",
    "SLLM_WAKE_TIMEOUT": "300s",
    "SLLM_POLICY": "least-loaded",
    "SLLM_CPU_SLOTS": "1",
    "SLLM_POOL_SIZE": "1",
    "SLLM_DRAM_CAPACITY": "256Mi",
    "SLLM_SSD_CAPACITY": "256Mi",
    "SLLM_SCALE_DOWN_WINDOW": "300s",
}


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- decisions ------------------------------------------------------------------------------
async def kv_write_s(bus: NatsBus, replicas: int, n: int) -> list[float]:
    """Seconds per put on a bucket like the scale bucket (``replicas``, one revision kept)."""
    kv = await bus.key_value("bench-kv-floor", replicas=replicas, history=1)
    times = []
    for i in range(n):
        started = time.perf_counter()
        await kv.put(f"k{i % 8}", b"x" * 64)
        times.append(time.perf_counter() - started)
    return times


async def watch_starts(kv: KeyValue, seen: dict[str, float]) -> None:
    """Record when each start record first appears in the scale bucket."""
    while True:
        async for entry in kv.watch():
            if entry is not None and entry.key.startswith(START) and entry.value is not None:
                seen.setdefault(entry.key[len(START) :], time.monotonic())


async def until(ready: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


async def one_wake(
    cluster: LocalCluster,
    admin: httpx.AsyncClient,
    via: str,
    name: str,
    nbytes: int,
    seen: dict[str, float],
) -> float:
    """Deploy ``name`` with no instance, send one request to gateway ``via``; seconds until
    the leader's start record for it. The answer must come; then the function is deleted."""
    await asyncio.to_thread(cluster.deploy, name, KEY, nbytes, min=0, max=1)
    url = cluster.url_of(via)

    async def known() -> bool:
        return (await admin.get(f"{url}/system/functions/{name}")).is_success

    await until(known, 30, f"{via} to know {name}")
    async with httpx.AsyncClient(timeout=300) as client:
        await client.get(f"{url}/healthz")  # the connection is made before the clock starts
        started = time.monotonic()
        call = asyncio.create_task(client.post(f"{url}/function/{name}", json=body("hi", False)))

        async def decided() -> bool:
            return any(k.startswith(f"{name}-") for k in seen)

        await until(decided, 60, f"the start record of {name}")
        at = min(t for k, t in seen.items() if k.startswith(f"{name}-"))
        r = await call
    if r.status_code != 200:
        raise RuntimeError(f"{name} via {via}: {r.status_code} {r.text}")
    await asyncio.to_thread(cluster.clear)
    return at - started


def tick_stats(metrics: str) -> dict[str, float]:
    """Mean and count of the leader's control-loop rounds, from its /metrics."""
    values = {}
    for name in ("sllm_control_tick_seconds_sum", "sllm_control_tick_seconds_count"):
        match = re.search(rf"^{name} (\S+)$", metrics, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    count = values["sllm_control_tick_seconds_count"]
    mean = values["sllm_control_tick_seconds_sum"] / count if count else 0.0
    return {"rounds": count, "mean_ms": mean * 1000}


async def decisions(cluster: LocalCluster, bus: NatsBus, nbytes: int, wakes: int) -> dict[str, Any]:
    floor = await kv_write_s(bus, 3, 60)
    scale = await bus.key_value(SCALE_BUCKET, replicas=3, history=1)
    seen: dict[str, float] = {}
    watcher = asyncio.create_task(watch_starts(scale, seen))
    leader = await asyncio.to_thread(cluster.leader)
    follower = next(g for g in GATEWAYS if g != leader)
    samples: dict[str, list[float]] = {"leader": [], "follower": []}
    try:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as admin:
            for i in range(wakes):
                role = "leader" if i % 4 in (0, 3) else "follower"  # ABBA
                via = leader if role == "leader" else follower
                samples[role].append(await one_wake(cluster, admin, via, f"wake-{i}", nbytes, seen))
            metrics = (await admin.get(f"{cluster.url_of(leader)}/metrics")).text
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return {
        "leader": leader,
        "decision_s": samples,
        "decision_median_ms": {k: statistics.median(v) * 1000 for k, v in samples.items()},
        "kv_write_median_ms": statistics.median(floor) * 1000,
        "kv_write_p90_ms": percentile(floor, 0.9) * 1000,
        "floor_ms": 2 * statistics.median(floor) * 1000,
        "leader_round": tick_stats(metrics),
    }


# --- throughput ------------------------------------------------------------------------------
async def instances_of(bus: NatsBus, function: str, n: int) -> list[tuple[str, str]]:
    """(address, secret) of ``function``'s ready instances, from the nodes' heartbeats."""
    found: dict[str, tuple[str, str]] = {}

    async def on_beat(msg: Message) -> None:
        beat = decode_as(msg.data, NodeHeartbeat)
        for inst in beat.instances:
            if inst.function == function and inst.state == "ready" and inst.address:
                found[inst.instance_id] = (inst.address, inst.secret)

    sub = await bus.subscribe(HEARTBEATS, on_beat)
    try:

        async def all_there() -> bool:
            return len(found) >= n

        await until(all_there, 60, f"{n} ready instances in the heartbeats")
    finally:
        await sub.unsubscribe()
    return sorted(found.values())


async def closed_loop(
    targets: list[tuple[str, dict[str, str]]], clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` clients sending whole requests round robin over ``targets`` (URL, headers)
    for ``seconds``; answers per second and latency."""
    latencies: list[float] = []
    failed = 0
    stop_at = time.monotonic() + seconds

    async def one(i: int) -> None:
        nonlocal failed
        n = i
        async with httpx.AsyncClient(timeout=60) as client:
            while time.monotonic() < stop_at:
                url, headers = targets[n % len(targets)]
                request = body(PROMPTS[n % len(PROMPTS)], False)
                started = time.monotonic()
                r = await client.post(url, json=request, headers=headers)
                if r.status_code == 200:
                    latencies.append(time.monotonic() - started)
                else:
                    failed += 1
                n += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "answers": len(latencies),
        "failed": failed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
        "loadavg": os.getloadavg()[0],
    }


async def throughput(
    cluster: LocalCluster, bus: NatsBus, nbytes: int, args: argparse.Namespace
) -> dict[str, Any]:
    clients, seconds = args.clients, args.seconds
    await asyncio.to_thread(cluster.deploy, "tput", KEY, nbytes, min=len(NODES), max=len(NODES))
    direct = [
        (f"{address}/v1/invoke", auth_header(secret))
        for address, secret in await instances_of(bus, "tput", len(NODES))
    ]
    through: list[tuple[str, dict[str, str]]] = [
        (f"{url}/function/tput", {}) for url in cluster.urls
    ]
    await closed_loop(through + direct, clients, 3.0)  # warm both paths
    runs: dict[str, list[dict[str, Any]]] = {"gateways": [], "direct": []}
    for _ in range(args.rounds):
        for path in ("gateways", "direct", "direct", "gateways"):  # ABBA
            targets = through if path == "gateways" else direct
            runs[path].append(await closed_loop(targets, clients, seconds))
    gw = statistics.median(r["rps"] for r in runs["gateways"])
    limit = statistics.median(r["rps"] for r in runs["direct"])
    return {
        "clients": clients,
        "seconds": seconds,
        "runs": runs,
        "gateways_rps": gw,
        "direct_rps": limit,
        "ratio": gw / limit if limit else None,
    }


# --- the run ---------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.tiny_model import build_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="sllm-bench-cluster-"))
    topo = netns.create([*GATEWAYS, *NODES], netns.LinkShape(args.rate))
    cluster = LocalCluster(root, nats_size=3, nats_host=topo.address, env=SETTINGS)
    before = machine()
    bus: NatsBus | None = None
    try:
        nbytes = cluster.add_checkpoint(build_tiny_llama(root / "hf", seed=5), KEY)
        cluster.start_nats()
        for name in GATEWAYS:
            cluster.start_gateway(name, host=topo[name])
        for i, name in enumerate(NODES):
            cluster.start_node(f"n{i}", wait=False, host=topo[name])
        for i in range(len(NODES)):
            cluster.wait_node(f"n{i}")
        assert cluster.nats is not None
        env = nats_client_env(cluster.nats)
        bus = await NatsBus.connect(
            env["SLLM_NATS_URL"], "bench-cluster", seed_file=env["SLLM_NATS_SEED_FILE"]
        )
        result: dict[str, Any] = {"machine_before": before, "rate": args.rate}
        result["decisions"] = await decisions(cluster, bus, nbytes, args.wakes)
        result["throughput"] = await throughput(cluster, bus, nbytes, args)
        result["machine_after"] = machine()
        return result
    finally:
        if bus is not None:
            await bus.close()
        cluster.stop()
        topo.remove()
        import shutil

        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        for node_id in cluster.nodes:
            node_env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(root / "cache" / node_id)}
            shutil.rmtree(dram_root(NodeSettings.from_env(node_env)), ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    d, t = result["decisions"], result["throughput"]
    lines = [
        f"machine: {result['machine_before']['cores']} cores, load average "
        f"{result['machine_before']['loadavg'][0]:.1f} before, "
        f"{result['machine_after']['loadavg'][0]:.1f} after; links {result['rate']}",
        f"decision (request -> start record), median ms: at the leader "
        f"{d['decision_median_ms']['leader']:.1f}, at the follower "
        f"{d['decision_median_ms']['follower']:.1f}",
        f"  floor: two replicated KV writes, {d['floor_ms']:.1f} ms "
        f"(one: median {d['kv_write_median_ms']:.1f}, p90 {d['kv_write_p90_ms']:.1f})",
        f"  leader's control-loop round: mean {d['leader_round']['mean_ms']:.2f} ms over "
        f"{d['leader_round']['rounds']:.0f} rounds",
        f"throughput, {t['clients']} clients: gateways {t['gateways_rps']:.1f} req/s, direct "
        f"to the instances {t['direct_rps']:.1f} req/s (ratio {t['ratio']:.2f})",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rate", default="1gbit", help="every host's link (tc tbf rate)")
    parser.add_argument("--wakes", type=int, default=8, help="cold wakes timed (ABBA)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds of throughput runs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/cluster.py: hosts are network namespaces: run it as root", file=sys.stderr)
        return 2
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
