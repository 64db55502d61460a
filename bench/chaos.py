"""Fault injection (issue 14): the table of the issue, run against real processes.

    .venv/bin/python bench/chaos.py --json bench/.data/chaos.json

A platform of real processes (``tests.cluster.LocalCluster``: nats-server, `sllm gateway
start`, `sllm node start`) serves a tiny random Llama; ``--clients`` clients keep invoking it
(alternating streamed and whole answers, greedy) while one part is killed by pid and started
again. Every answer is classified against the same request made with no fault
(``tests.chaos``: ok = byte-identical; error = a clear 4xx/5xx JSON error or an error event;
refused = nothing listened; cut = accepted and cut off without [DONE] or an error; wrong =
anything else, a 500 or a hang included). Rows:

- ``instance killed``: the instance process SIGKILLed under load (a new one is started);
- ``node killed``: the node SIGKILLed, started again after ``--outage-s``;
- ``nats-server killed``: SIGKILLed, started again after ``--outage-s``; an admin delete and
  create during the outage must answer 503 and never be applied;
- ``gateway killed``: SIGKILLed, started again after ``--gateway-outage-s``;
- ``two functions, DRAM for one``: a node whose DRAM tier holds one of two checkpoints, the
  two functions invoked in turn (before: one was refused every time);
- ``sllm up, node killed``: `sllm up` in its own home, its node SIGKILLed: `sllm up` must stay
  up and restart it, and the function serve again.

Each row prints sent / ok / error / refused / cut / wrong and notes; a row passes when nothing
is wrong (and, for the last two, nothing was refused by the platform).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from sllm_cli.servers import free_port, stop_process
from tests.chaos import Tally, clients_on, invoke, references
from tests.cluster import AUTH, LocalCluster

SETTINGS = {
    "SLLM_HEARTBEAT_INTERVAL": "0.5s",
    "SLLM_WAKE_TIMEOUT": "300s",
    "SLLM_POLICY": "locality",
    "SLLM_CPU_SLOTS": "2",
    "SLLM_POOL_SIZE": "1",
    "SLLM_DRAM_CAPACITY": "256Mi",
    "SLLM_SSD_CAPACITY": "256Mi",
}


async def node_live(cluster: LocalCluster, node_id: str) -> bool:
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as admin:
        try:
            nodes = (await admin.get(f"{cluster.url}/system/nodes")).json()
        except httpx.HTTPError:
            return False
    return any(n["node_id"] == node_id and n["live"] for n in nodes)


async def under_load(
    cluster: LocalCluster, function: str, n_clients: int, fault: Callable[[Tally], Awaitable[str]]
) -> dict[str, Any]:
    """Clients on ``function`` while ``fault`` runs (it returns its notes); then 6 more ok."""
    async with clients_on(cluster.url, function, count=n_clients) as tally:
        await tally.until("ok", 6)
        started = time.monotonic()
        notes = await fault(tally)
        recovered = time.monotonic()
        await tally.until("ok", 6, since=recovered, timeout_s=300)
        first_ok = min(
            o.started + o.seconds for o in tally.between(recovered).outcomes if o.kind == "ok"
        )
    return row(
        tally,
        notes,
        {
            "fault_s": round(recovered - started, 1),
            "first_ok_after_s": round(first_ok - recovered, 2),
        },
    )


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.2)


def row(tally: Tally, notes: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    counts = tally.counts()
    return {
        "sent": len(tally.outcomes),
        **counts,
        "errors": tally.errors(),
        "wrong_examples": [o.detail for o in tally.wrong()[:5]],
        "notes": notes,
        "passed": counts["wrong"] == 0,
        **(extra or {}),
    }


async def instance_killed(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    cluster.deploy("ck-instance", KEY, NBYTES, min=0, max=1, keep_alive="10m")

    async def fault(tally: Tally) -> str:
        node = psutil.Process(cluster.nodes["a"].process.pid)
        serving = [
            p
            for p in node.children()
            if "runtime.instance.worker" in " ".join(p.cmdline()) and p.net_connections(kind="tcp")
        ]
        for proc in serving:
            proc.send_signal(signal.SIGKILL)
        await tally.until("ok", 3, since=time.monotonic(), timeout_s=120)
        return f"SIGKILLed {len(serving)} serving instance process(es)"

    return await under_load(cluster, "ck-instance", args.clients, fault)


async def node_killed(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    cluster.deploy("ck-node", KEY, NBYTES, min=0, max=1, keep_alive="10m")

    async def fault(tally: Tally) -> str:
        cluster.kill_node("a")
        await asyncio.sleep(args.outage_s)
        await asyncio.to_thread(cluster.start_node, "a")
        return f"node SIGKILLed, started again after {args.outage_s:g}s"

    return await under_load(cluster, "ck-node", args.clients, fault)


async def nats_killed(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    cluster.deploy("ck-nats", KEY, NBYTES, min=0, max=1, keep_alive="10m")
    cluster.deploy("ck-keep", KEY, NBYTES, min=0, max=1)
    writes: dict[str, Any] = {}

    async def fault(tally: Tally) -> str:
        cluster.kill(cluster.nats)
        async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=30) as admin:
            t0 = time.monotonic()
            r = await admin.delete("/system/functions/ck-keep")
            writes["delete"] = (r.status_code, round(time.monotonic() - t0, 3))
            spec = {
                "spec": {"name": "ck-late", "model": "m"},
                "checkpoint": "k/x",
                "checkpoint_bytes": 1,
            }
            writes["create"] = (await admin.post("/system/functions", json=spec)).status_code
            await asyncio.sleep(args.outage_s)
            cluster.start_nats()
            await until(lambda: node_live(cluster, "a"), 120.0, "the node's heartbeats")
            await asyncio.sleep(2.0)
            names = [f["name"] for f in (await admin.get("/system/functions")).json()]
        writes["applied_later"] = "ck-late" in names or "ck-keep" not in names
        return (
            f"nats-server SIGKILLed, started again after {args.outage_s:g}s; during the outage "
            f"DELETE -> {writes['delete'][0]} in {writes['delete'][1]}s, POST -> "
            f"{writes['create']}; applied later: {writes['applied_later']}"
        )

    result = await under_load(cluster, "ck-nats", args.clients, fault)
    result["admin_writes"] = writes
    result["passed"] = result["passed"] and not writes["applied_later"]
    return result


async def gateway_killed(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    cluster.deploy("ck-gateway", KEY, NBYTES, min=0, max=1, keep_alive="10m")

    async def fault(tally: Tally) -> str:
        cluster.kill(cluster.gateway)
        await asyncio.sleep(args.gateway_outage_s)
        await asyncio.to_thread(cluster.start_gateway)
        return f"gateway SIGKILLed, started again after {args.gateway_outage_s:g}s (one gateway)"

    return await under_load(cluster, "ck-gateway", args.clients, fault)


async def dram_for_one(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    cluster.kill_node("a")
    cluster.node_env["d"] = {"SLLM_DRAM_CAPACITY": str(int(max(NBYTES, OTHER_BYTES) * 1.5))}
    await asyncio.to_thread(cluster.start_node, "d")
    cluster.deploy("ck-dram-a", KEY, NBYTES, min=0, max=1, keep_alive="10m")
    cluster.deploy("ck-dram-b", OTHER_KEY, OTHER_BYTES, min=0, max=1, keep_alive="10m")
    tally = Tally()
    async with httpx.AsyncClient(timeout=300) as client:
        expected = {n: await references(client, cluster.url, n) for n in ("ck-dram-a", "ck-dram-b")}
        for i in range(args.dram_rounds * 2):
            name = ("ck-dram-a", "ck-dram-b")[i % 2]
            tally.outcomes.append(
                await invoke(
                    client,
                    cluster.url,
                    name,
                    "hello",
                    expected[name]["hello"],
                    stream=False,
                    timeout_s=300,
                )
            )
    cluster.kill_node("d")
    del cluster.nodes["d"]
    await asyncio.to_thread(cluster.start_node, "a")
    result = row(tally, "node DRAM holds 1 of 2 checkpoints; the 2 functions invoked in turn")
    result["passed"] = result["ok"] == result["sent"]
    return result


async def up_node_killed(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    env.update(SLLM_HOME=str(root / "up-home"), HOME=str(root / "up-user"))
    (root / "up-user").mkdir()
    output = root / "up.out"
    up = await asyncio.to_thread(start_up, port, env, output)
    url = f"http://127.0.0.1:{port}"

    async def printed(text: str) -> bool:
        assert up.poll() is None, "sllm up exited:\n" + output.read_text()
        return text in output.read_text()

    try:
        await until(lambda: printed("sllm is up"), 300.0, "sllm up")
        auth = {"authorization": f"Bearer {(root / 'up-home' / 'token').read_text().strip()}"}
        from runtime.store.local import LocalStore
        from runtime.store.push import push_checkpoint

        # `sllm up`'s store is the local directory $SLLM_HOME/store
        push_checkpoint(CONVERTED, LocalStore(root / "up-home" / "store"), KEY)
        spec = {"name": "ck-up", "model": "tiny", "handler": "chat", "auth": "public",
                "scale": {"keep_alive": "10m"}}  # fmt: skip
        async with httpx.AsyncClient(headers=auth, timeout=10) as admin:
            r = await admin.post(
                f"{url}/system/functions",
                json={"spec": spec, "checkpoint": KEY, "checkpoint_bytes": NBYTES},
            )
        assert r.status_code == 201, r.text
        async with clients_on(url, "ck-up", count=args.clients) as tally:
            await tally.until("ok", 6)
            node = next(
                p
                for p in psutil.Process(up.pid).children()
                if "node start" in " ".join(p.cmdline())
            )
            node.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await until(lambda: printed("node restarted"), 120.0, "the node's restart")
            restarted = time.monotonic()
            await tally.until("ok", 6, since=restarted, timeout_s=300)
        alive = up.poll() is None
        result = row(
            tally,
            "sllm up's node SIGKILLed",
            {"sllm_up_alive": alive, "restart_logged_after_s": round(restarted - killed, 2)},
        )
        result["passed"] = result["passed"] and alive
        return result
    finally:
        await asyncio.to_thread(stop_process, up, 90.0)


def start_up(port: int, env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    with open(output, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", "up", "--port", str(port), "--cpu-slots", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


KEY, NBYTES = "checkpoints/tiny/chaos", 0
OTHER_KEY, OTHER_BYTES = "checkpoints/other/chaos", 0
CONVERTED = Path()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    global NBYTES, OTHER_BYTES, CONVERTED
    from tests.tiny_model import build_tiny_llama

    root = Path(tempfile.mkdtemp(prefix="sllm-chaos-"))
    cluster = LocalCluster(root / "cluster", env=dict(SETTINGS))
    NBYTES = cluster.add_checkpoint(build_tiny_llama(root / "tiny", seed=0), KEY)
    OTHER_BYTES = cluster.add_checkpoint(build_tiny_llama(root / "other", seed=7), OTHER_KEY)
    CONVERTED = cluster.root / "converted" / KEY.replace("/", "_")
    rows: dict[str, dict[str, Any]] = {}
    cluster.start_nats()
    cluster.start_gateway()
    cluster.start_node("a")
    try:
        for name, scenario in (
            ("instance killed", instance_killed),
            ("node killed", node_killed),
            ("nats-server killed", nats_killed),
            ("gateway killed", gateway_killed),
            ("two functions, DRAM for one", dram_for_one),
        ):
            if args.only and args.only not in name:
                continue
            print(f"running: {name} ...", file=sys.stderr, flush=True)
            rows[name] = await scenario(cluster, args)
            print(f"  {rows[name]}", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        for node_id in ("a", "d"):
            env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(cluster.root / "cache" / node_id)}
            import shutil

            shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
    if not args.only or args.only in "sllm up, node killed":
        print("running: sllm up, node killed ...", file=sys.stderr, flush=True)
        rows["sllm up, node killed"] = await up_node_killed(root, args)
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "settings": {
            **SETTINGS,
            "clients": args.clients,
            "outage_s": args.outage_s,
            "gateway_outage_s": args.gateway_outage_s,
        },
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print("| fault | sent | ok | error | refused | cut | wrong | passed | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in result["rows"].items():
        errors = ", ".join(f"{k} x{v}" for k, v in r["errors"].items())
        notes = r["notes"] + (f"; errors: {errors}" if errors else "")
        print(
            f"| {name} | {r['sent']} | {r['ok']} | {r['error']} | {r['refused']} | "
            f"{r['cut']} | {r['wrong']} | {'yes' if r['passed'] else 'NO'} | {notes} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--outage-s", type=float, default=20.0)
    parser.add_argument("--gateway-outage-s", type=float, default=10.0)
    parser.add_argument("--dram-rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="run the rows whose name contains this")
    cli_args = parser.parse_args()
    outcome = asyncio.run(main(cli_args))
    print_table(outcome)
    if cli_args.json:
        cli_args.json.parent.mkdir(parents=True, exist_ok=True)
        cli_args.json.write_text(json.dumps(outcome, indent=2))
    sys.exit(0 if all(r["passed"] for r in outcome["rows"].values()) else 1)
