"""Node cold-start benchmark (issues 4, 19): command-to-ready of a ~2 GB checkpoint from DRAM,
SSD and the store, with and without the pre-started pool, with instances as processes and in
containers (``--modes``, run in ABBA order across repetitions), against two baselines.

    .venv/bin/python bench/coldstart_node.py --json bench/.data/coldstart_node.json

Real parts: nats-server, SeaweedFS (S3 store), `sllm node start` as a child process, instance
processes. A random Llama-shaped float32 model (~2 GB, 9 layers of hidden 2048) is written as a
Hugging Face safetensors directory once (bench/.data), converted, and pushed to S3.

- ``store`` / ``ssd`` / ``dram``: LoadCmd sent -> ready event received, measured at the
  client. store: a node with empty caches, page cache dropped; ssd: the node restarted with its
  DRAM tier removed, page cache dropped; dram: a second load after an unload.
- ``pool`` 1 vs 0: with 0 the node starts the instance process on the load (imports included).
- ``hf_local``: a new process imports torch+transformers (``import_s``, apart), then
  ``from_pretrained`` (page cache dropped) with every parameter page touched (``load_s``: the
  state of an instance at ``ready``, which on CPU runs no forward pass: docs/runtime.md); a
  forward pass after it is timed apart (``forward_s``).
- ``hf_warm`` (the fair baseline of a DRAM hit): a process that has imported torch and
  transformers, loaded this model once and run a forward pass (model class built, kernels
  used, files in the page cache, read again just before) times a second ``from_pretrained``
  with every page touched (``load_s``), a forward pass apart. ``speedup.dram_vs_hf_warm``: >= 10x.
- ``hf_s3``: the same after downloading the directory from S3 (KServe's storage initializer);
  ``download_s`` apart, so its time after process start is ``download_s + load_s``.
- ``process_start_s``: a pre-started instance process's imports and warm-up (off the path).

The nodes take ``SLLM_DRAM_DIR`` from this environment (a tmpfs mounted ``huge=within_size``
gives 2 MiB pages, docs/tiers.md); the summary records it and its huge-page mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from _coldstart_baselines import (
    DATA,
    drop_caches,
    process_start,
    run_baseline,
    run_warm_baseline,
)

KEY = "checkpoints/bench/2gb"
S3_KEY_ID, S3_SECRET = "bench", "bench-secret"


def build_model_dir(hf_dir: Path) -> None:
    from tests.tiny_model import TinyConfig, build_tiny_llama

    config = TinyConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=9,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_llama(tmp, seed=0, config=config)
    tmp.rename(hf_dir)


def prepare(s3_env: dict[str, str]) -> tuple[Path, int]:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.ckpt.index import read_index
    from runtime.store import open_store
    from runtime.store.push import push_checkpoint
    from sllm.settings import StoreSettings

    hf_dir, ckpt = DATA / "hf", DATA / "ckpt"
    if not hf_dir.exists():
        build_model_dir(hf_dir)
    if not ckpt.exists():
        convert_checkpoint(hf_dir, ckpt)
    store = open_store(StoreSettings.from_env({**s3_env, "SLLM_STORE_URL": "s3://models/sllm"}))
    raw = open_store(StoreSettings.from_env({**s3_env, "SLLM_STORE_URL": "s3://models/hf"}))
    if not store.exists(f"{KEY}/index.json"):  # the S3 data directory persists between runs
        push_checkpoint(ckpt, store, KEY)
        for f in hf_dir.iterdir():
            raw.put_file(f"bench/{f.name}", str(f))
    return hf_dir, read_index(ckpt).total_bytes


class Node:
    def __init__(self, env: dict[str, str], cache_dir: Path, pool: int, node_id: str) -> None:
        self.env = {
            **env,
            "SLLM_NODE_ID": node_id,
            "SLLM_CACHE_DIR": str(cache_dir),
            "SLLM_POOL_SIZE": str(pool),
            "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
            "SLLM_CPU_SLOTS": "1",
            "SLLM_DRAM_CAPACITY": "6Gi",
            "SLLM_SSD_CAPACITY": "8Gi",
            "SLLM_HEARTBEAT_INTERVAL": "0.5s",
        }
        self.node_id = node_id
        self.proc: subprocess.Popen[bytes] | None = None

    def dram_root(self) -> Path:
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        return dram_root(NodeSettings.from_env(self.env))

    def start(self) -> None:
        log = open(DATA / f"{self.node_id}.log", "ab")  # noqa: SIM115 (lives as long as the node)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", "-v", "node", "start", "--drain", "5s"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            self.proc = None


async def load_once(nats_url: str, node: Node, instance_id: str) -> dict[str, Any]:
    from sllm.messages import (
        EVENTS,
        CmdReply,
        InstanceEvent,
        LoadCmd,
        UnloadCmd,
        decode_as,
        encode,
        node_cmd_subject,
    )
    from sllm.nats_bus import NatsBus
    from sllm.spec import FunctionRecord, FunctionSpec, Resources

    bus = await NatsBus.connect(nats_url, name="bench")
    events: asyncio.Queue[InstanceEvent] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        event = decode_as(msg.data, InstanceEvent)
        if event.instance_id == instance_id:
            await events.put(event)

    await bus.subscribe(EVENTS, on_event)
    # 4 GiB: a container's memory limit holds the instance (torch, activations), not the image
    # it maps (the DRAM tier's pages are charged to the node)
    spec = FunctionSpec(name="bench", model="bench", resources=Resources(1, 4 << 30))
    record = FunctionRecord(spec=spec, checkpoint=KEY, checkpoint_bytes=0).to_dict()
    subject = node_cmd_subject(node.node_id)
    start = time.monotonic()
    reply = decode_as(
        await bus.request(subject, encode(LoadCmd(instance_id, "bench", record, "")), 30),
        CmdReply,
    )
    assert reply.ok, reply
    ready = await asyncio.wait_for(events.get(), 600)
    elapsed = time.monotonic() - start
    assert ready.kind == "ready", ready.error
    await bus.request(subject, encode(UnloadCmd(instance_id, 1.0)), 30)
    stopped = await asyncio.wait_for(events.get(), 120)
    assert stopped.kind == "stopped"
    await bus.close()
    return {
        "command_to_ready_s": elapsed,
        "tier": ready.tier,
        "node_load_s": ready.load_s,
        **instance_timings(node, instance_id),
    }


def instance_timings(node: Node, instance_id: str) -> dict[str, Any]:
    """The instance's own timings (map, build, warm-up) from the node's ready log line."""
    pattern = re.compile(
        rf"instance {re.escape(instance_id)} ready .* pre_started=(\w+) .*timings=(\{{.*\}})"
    )
    found: dict[str, Any] = {}
    for line in (DATA / f"{node.node_id}.log").read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if m:
            found = {"pre_started": m.group(1) == "True", "instance": json.loads(m.group(2))}
    return found


async def _wait_idle(nats_url: str, node: Node, pool: int, timeout_s: float) -> None:
    from sllm.messages import HEARTBEATS, NodeHeartbeat, decode_as
    from sllm.nats_bus import NatsBus

    bus = await NatsBus.connect(nats_url, name="bench-wait")
    ready = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        beat = decode_as(msg.data, NodeHeartbeat)
        if beat.node_id == node.node_id and beat.pool_idle >= pool and not beat.instances:
            ready.set()

    await bus.subscribe(HEARTBEATS, on_beat)
    try:
        await asyncio.wait_for(ready.wait(), timeout_s)
    finally:
        await bus.close()


def wait_node_idle(nats_url: str, node: Node, pool: int) -> None:
    """Until the node heartbeats with its pool full and no instance (start-up: imports, tier
    probe and pool processes, ~5-20 s on this shared machine), then 2 s of quiet."""
    asyncio.run(_wait_idle(nats_url, node, pool, 180))
    assert node.proc is not None and node.proc.poll() is None, "node exited"
    time.sleep(2)


def wait_for_premap(node: Node, timeout_s: float = 60.0) -> None:
    """Until the refilled pool process has mapped the DRAM image (its log line), as it
    would have long before the next request in steady state."""
    log = DATA / f"{node.node_id}.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines()
        last_stop = max((i for i, line in enumerate(lines) if " stopped" in line), default=-1)
        if any("premapped" in line for line in lines[last_stop + 1 :]):
            return
        time.sleep(0.2)


def run_node_scenarios(
    nats_url: str, s3_env: dict[str, str], pool: int, rep: int, mode: str, image: str
) -> dict[str, Any]:
    env = {
        **os.environ, **s3_env, "SLLM_NATS_URL": nats_url, "SLLM_STORE_URL": "s3://models/sllm",
        "SLLM_INSTANCES": mode, "SLLM_INSTANCE_IMAGE": image,
    }  # fmt: skip
    tag = f"{mode[0]}{pool}-r{rep}"  # p: process, c: container
    cache_dir = DATA / f"cache-{tag}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    node = Node(env, cache_dir, pool, f"bench-{tag}")
    (DATA / f"{node.node_id}.log").unlink(missing_ok=True)
    shutil.rmtree(node.dram_root(), ignore_errors=True)
    out: dict[str, Any] = {}
    try:
        node.start()
        wait_node_idle(nats_url, node, pool)
        drop_caches()
        out["store"] = asyncio.run(load_once(nats_url, node, f"s-{tag}"))
        wait_node_idle(nats_url, node, pool)  # the pool refills after a load
        if pool:
            wait_for_premap(node)
        out["dram"] = asyncio.run(load_once(nats_url, node, f"d-{tag}"))
        node.stop()
        shutil.rmtree(node.dram_root(), ignore_errors=True)
        node.start()
        wait_node_idle(nats_url, node, pool)
        drop_caches()
        out["ssd"] = asyncio.run(load_once(nats_url, node, f"f-{tag}"))
    finally:
        node.stop()
        shutil.rmtree(node.dram_root(), ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def runtime_image() -> str:
    """This checkout's runtime image for container mode (built now if needed)."""
    from runtime.container.images import ensure_runtime_image
    from runtime.container.podman import engine_problem, find_podman
    from runtime.node.main import image_cache_dir

    podman = find_podman()
    if podman is None:
        raise SystemExit(f"--modes container: {engine_problem()}")
    return ensure_runtime_image(podman, image_cache_dir())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="write results here")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="process,container", help="instance backends")
    parser.add_argument("--skip-baselines", action="store_true", help="node scenarios only")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    image = runtime_image() if "container" in modes else ""
    logging.getLogger("sllm.nats_bus").setLevel(logging.ERROR)  # bench clients disconnecting
    from sllm_cli.servers import start_nats, start_seaweedfs

    DATA.mkdir(parents=True, exist_ok=True)
    os.environ.update({"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET})
    nats = start_nats(DATA / "nats")
    weed = start_seaweedfs(DATA / "weed")
    s3_env = {
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "SLLM_S3_ENDPOINT": f"http://127.0.0.1:{weed.ports['s3']}",
        "SLLM_S3_PATH_STYLE": "true",
    }
    try:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=s3_env["SLLM_S3_ENDPOINT"], region_name="us-east-1"
        )
        for _ in range(100):
            try:
                client.create_bucket(Bucket="models")
                break
            except Exception:
                time.sleep(0.3)
        hf_dir, nbytes = prepare(s3_env)
        nats_url = f"nats://127.0.0.1:{nats.ports['client']}"
        runs: dict[str, list[dict[str, Any]]] = {}
        baselines: dict[str, list[dict[str, float]]] = {"hf_local": [], "hf_s3": [], "hf_warm": []}
        starts: list[float] = []
        loads: list[float] = []
        env = {**os.environ, **s3_env}
        for rep in range(args.repeat):
            loads.append(os.getloadavg()[0])
            for mode in modes if rep % 2 == 0 else modes[::-1]:  # ABBA
                prefix = "" if mode == "process" else f"{mode}."
                for pool, name in ((1, "pool"), (0, "no_pool")):
                    result = run_node_scenarios(nats_url, s3_env, pool, rep, mode, image)
                    runs.setdefault(prefix + name, []).append(result)
            if args.skip_baselines:
                continue
            baselines["hf_local"].append(run_baseline(str(hf_dir), env))
            baselines["hf_s3"].append(run_baseline("s3://models/hf/bench", env))
            baselines["hf_warm"].append(run_warm_baseline(hf_dir, env))
            starts.append(process_start())
            print(json.dumps({"rep": rep, "runs": {k: v[-1] for k, v in runs.items()}}), flush=True)
    finally:
        weed.stop()
        nats.stop()
    from runtime.cache.hugepages import dram_pages

    dram_dir = Path(os.environ.get("SLLM_DRAM_DIR") or "/dev/shm")
    summary: dict[str, Any] = {
        "checkpoint_bytes": nbytes,
        "repeat": args.repeat,
        "load_average_per_rep": loads,
        # the nodes' DRAM tier (SLLM_DRAM_DIR from this environment) and its huge-page mode
        "dram_dir": str(dram_dir),
        "dram_huge_pages": dram_pages(dram_dir).huge,
    }
    for mode, reps in runs.items():
        for tier in ("dram", "ssd", "store"):
            summary[f"{mode}.{tier}.command_to_ready_s"] = median(
                [r[tier]["command_to_ready_s"] for r in reps]
            )
    if {"process", "container"} <= set(modes):
        for name in ("pool", "no_pool"):
            for tier in ("dram", "ssd", "store"):
                summary[f"ratio.container_vs_process.{name}.{tier}"] = (
                    summary[f"container.{name}.{tier}.command_to_ready_s"]
                    / summary[f"{name}.{tier}.command_to_ready_s"]
                )
    if args.skip_baselines or "process" not in modes:
        return finish(args.json, summary, runs, baselines, starts)
    for name, reps in baselines.items():
        for key in ("import_s", "download_s", "load_s", "forward_s", "process_total_s"):
            if all(key in r for r in reps):
                summary[f"{name}.{key}"] = median([r[key] for r in reps])
    summary["process_start_s"] = median(starts)
    summary["hf_s3.after_start_s"] = median(
        [r["download_s"] + r["load_s"] for r in baselines["hf_s3"]]
    )
    dram = summary["pool.dram.command_to_ready_s"]
    summary["speedup.dram_vs_hf_local_after_start"] = summary["hf_local.load_s"] / dram
    # the fair one: warm page cache, model class already built, in both
    summary["speedup.dram_vs_hf_warm"] = summary["hf_warm.load_s"] / dram
    summary["target.dram_vs_hf_warm"] = {
        "target": 10.0,
        "value": round(summary["speedup.dram_vs_hf_warm"], 2),
        "met": summary["speedup.dram_vs_hf_warm"] >= 10.0,
    }
    summary["speedup.store_vs_hf_s3_after_start"] = (
        summary["hf_s3.after_start_s"] / summary["pool.store.command_to_ready_s"]
    )
    return finish(args.json, summary, runs, baselines, starts)


def finish(path: Path, summary: dict[str, Any], *parts: Any) -> int:
    runs, baselines, starts = parts
    result = {"summary": summary, "runs": runs, "baselines": baselines, "process_start": starts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
