"""Backends benchmark (issue 13): sllm with the vLLM backend, sllm with the transformers backend,
and plain vLLM's OpenAI server (the peer), on this machine, in one run.

    .venv/bin/python bench/backends.py --json bench/.data/backends.json

Models: SmolLM2-135M-Instruct (the demo's GGUF, as bfloat16 safetensors) and a random Llama of
~1.1B parameters (SmolLM2's tokenizer, bfloat16). Everything goes through the paths that serve:
the peer is ``python -m vllm.entrypoints.openai.api_server`` as its users start it (the
``vllm`` console script looks up package metadata this install lacks); sllm is nats-server,
``sllm gateway start`` and ``sllm node start`` (one CPU slot: the instance gets both cores),
requests through the gateway's OpenAI API, checkpoints in a local-directory store.

- ``throughput``: streamed chat completions, greedy, ``--tokens`` each, from 1, 8 and 32
  concurrent clients: output tokens/s (usage, over the wave's wall time) and TTFT p50/p99.
  Systems run in ``--order``: by default peer, sllm+vLLM, sllm+transformers, sllm+vLLM, peer
  (ABBA for the pair the target compares; transformers once, to keep a run under ~1 h here);
  each visit runs every concurrency; medians. The peer runs eager (what sllm's vLLM backend
  runs on CPU; ``--peer-compiled`` adds the default compiled peer).
- ``coldstart``: request to first token from zero replicas with the checkpoint in DRAM (the
  idle vLLM process's engine kept for the model, and built), on SSD (node restarted, DRAM tier
  removed, page cache dropped) and in the store (SSD cache removed too); against the peer's
  start-to-first-token: eager, compiled (its first start: compiles), compiled again (cached).
  "Built" is a load right after the other model's: with one vLLM process in the node's pool
  (``--vllm-pool-size``, default 1) its engine is the other model's, and the load takes the
  spare process (``--vllm-spare``, default 1, the node's default) and builds there, or with no
  spare frees that engine first; with two, the second process still holds this model's engine
  and the load keeps it. The JSON says which (``dram_built_engine``, and ``engine`` beside
  each target). After the kept engine's and the
  transformers backend's cold starts, back-to-back requests for 8 s (``*_following``: offset,
  TTFT): the node refills its pool once the first request was answered, beside these.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _backends_setup import DATA, Peer, build_models  # noqa: E402

TOKEN = "bench-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
CONCURRENCY = (1, 8, 32)
MODELS = ("smollm2", "llama1b")
SYSTEMS = ("peer", "sllm-vllm", "sllm-transformers")


# -- the platform ------------------------------------------------------------------------------
class Platform:
    """nats-server, gateway and one node (one CPU slot), a local-directory store."""

    def __init__(self, root: Path, vllm_pool_size: int = 1, vllm_spare: int = 1) -> None:
        from sllm.nats_auth import NatsCredentials
        from sllm_cli.servers import free_port, nats_client_env, start_nats

        self.root = root
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        self.nats = start_nats(root / "nats", credentials=NatsCredentials(root / "creds"))
        self.port = free_port()
        self.env = {**os.environ, **nats_client_env(self.nats), "SLLM_TOKEN": TOKEN,
                    "SLLM_STORE_URL": str(self.store), "SLLM_GATEWAY_PORT": str(self.port),
                    "SLLM_WAKE_TIMEOUT": "900s", "SLLM_REQUEST_TIMEOUT": "1800s",
                    "SLLM_SCALE_DOWN_WINDOW": "1s"}  # fmt: skip
        self.node_env = {**self.env, **nats_client_env(self.nats, "bench"),
                         "SLLM_NODE_ID": "bench", "SLLM_CACHE_DIR": str(root / "cache"),
                         "SLLM_CPU_SLOTS": "1", "SLLM_POOL_SIZE": "1", "SLLM_VLLM": "on",
                         "SLLM_VLLM_POOL_SIZE": str(vllm_pool_size),
                         "SLLM_VLLM_SPARE": str(vllm_spare), "SLLM_DRAM_CAPACITY": "8Gi",
                         "SLLM_SSD_CAPACITY": "10Gi", "SLLM_HEARTBEAT_INTERVAL": "0.5s"}  # fmt: skip
        self.vllm_processes = vllm_pool_size + (vllm_spare if vllm_pool_size else 0)
        self.gateway = self._spawn(["gateway", "start"], self.env, "gateway.log")
        self.node: subprocess.Popen[bytes] | None = None
        self.start_node()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "sllm_cli.main", "-v", *argv],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def start_node(self) -> None:
        log = self.root / "node.log"
        self.log_mark = log.stat().st_size if log.exists() else 0  # this node's lines start here
        self.node = self._spawn(["node", "start", "--drain", "5s"], self.node_env, "node.log")
        self.wait_quiet()

    def wait_quiet(self, timeout_s: float = 600.0) -> None:
        """Until both pools are full again (a vLLM process imported, a transformers one warm)
        and, after a vLLM start, the idle vLLM process built its engine: what a load leaves
        running for a while (tens of seconds of CPU here), done before anything is measured."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                nodes = httpx.get(f"{self.url}/system/nodes", headers=AUTH, timeout=5).json()
                text = (self.root / "node.log").read_text(errors="replace")[self.log_mark :]
                started = text.rfind("backend=vllm engine=")  # -1: no vLLM instance yet
                # a prebuild vLLM refused (too little free memory here) settles it too
                done = max(text.rfind(m) for m in ("prebuilt a vLLM", "prebuilding a vLLM"))
                built = started < 0 or done > started
                full = any(n.get("pool_idle", 0) >= 1 + self.vllm_processes for n in nodes)
                if full and built:
                    self._wait_idle_cpu()
                    return
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "the node did not settle"
            time.sleep(1)

    def _wait_idle_cpu(self, window_s: float = 2.0, busy_s: float = 0.2) -> None:
        """Until the node and its processes used under ``busy_s`` of CPU in ``window_s``: the
        other idle processes' engines built too (a pool of several vLLM processes)."""
        import psutil

        assert self.node is not None
        node = psutil.Process(self.node.pid)

        def cpu() -> float:
            total = 0.0
            for proc in [node, *node.children(recursive=True)]:
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue  # ended meanwhile
                total += times.user + times.system
            return total

        before = cpu()
        while True:
            time.sleep(window_s)
            now = cpu()
            if now - before < busy_s:
                return
            before = now

    def _last_vllm_ready(self) -> str:
        """The node's ready line of the latest vLLM instance, from ``backend=vllm`` on."""
        text = (self.root / "node.log").read_text(errors="replace")[self.log_mark :]
        at = text.rfind("backend=vllm engine=")
        return text[at:].split("\n", 1)[0] if at >= 0 else ""

    def last_engine(self) -> str:
        """How the latest vLLM instance got its engine (built, kept, reloaded)."""
        line = self._last_vllm_ready()
        return line.split()[1].removeprefix("engine=") if line else ""

    def last_timings(self) -> dict[str, float]:
        """The latest vLLM instance's load timings: how its weights came
        (``weights_bound_bytes``, ``weights_copied_bytes``), its KV cache, its build."""
        _, found, timings = self._last_vllm_ready().partition(" timings=")
        return dict(json.loads(timings)) if found else {}

    def stop_node(self) -> None:
        from sllm_cli.servers import stop_process

        if self.node is not None:
            stop_process(self.node, 60)
            self.node = None

    def dram_root(self) -> Path:
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        return dram_root(NodeSettings.from_env(self.node_env))

    def restart_node(self, *, ssd: bool) -> None:
        """Cold tiers: the DRAM tier removed (and the SSD cache unless ``ssd``), page cache
        dropped."""
        self.stop_node()
        shutil.rmtree(self.dram_root(), ignore_errors=True)
        if not ssd:
            shutil.rmtree(self.root / "cache" / "ssd", ignore_errors=True)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        self.start_node()

    def deploy(self, name: str, key: str, backend: str, memory: str) -> None:
        spec = {"name": name, "model": name, "backend": backend, "auth": "public",
                "resources": {"memory": memory}, "scale": {"max": 1, "keep_alive": "3600s"},
                "generation": {"max_tokens": 256, "temperature": 0.0}}  # fmt: skip
        body = {"spec": spec, "checkpoint": key, "checkpoint_bytes": 1}
        r = httpx.post(f"{self.url}/system/functions", json=body, headers=AUTH, timeout=30)
        assert r.status_code in (200, 201), r.text

    def scale_to_zero(self, name: str) -> None:
        httpx.post(f"{self.url}/system/scale/{name}", json={"replicas": 0}, headers=AUTH,
                   timeout=30)  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            fn = httpx.get(f"{self.url}/system/functions/{name}", headers=AUTH, timeout=10).json()
            if not fn.get("instances"):
                return
            assert time.monotonic() < deadline, f"{name} did not scale to zero"
            time.sleep(0.5)

    def close(self) -> None:
        from sllm_cli.servers import stop_process

        self.stop_node()
        stop_process(self.gateway, 30)
        self.nats.stop()
        shutil.rmtree(self.dram_root(), ignore_errors=True)


# -- load ---------------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, url: str, model: str, tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.monotonic()
    ttft, used = None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                ttft = time.monotonic() - start
            if chunk.get("usage"):
                used = int(chunk["usage"]["completion_tokens"])
    return {"ttft_s": ttft if ttft is not None else time.monotonic() - start, "tokens": used}


async def wave(url: str, model: str, clients: int, per_client: int, tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=3600) as http:

        async def client() -> list[dict[str, Any]]:
            return [await one_request(http, url, model, tokens) for _ in range(per_client)]

        start = time.monotonic()
        results = [
            r for rs in await asyncio.gather(*[client() for _ in range(clients)]) for r in rs
        ]
        wall = time.monotonic() - start
    ttfts = sorted(r["ttft_s"] for r in results)
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "requests": len(results)}  # fmt: skip


def first_token_s(url: str, model: str) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(timeout=3600) as http:
            return float((await one_request(http, url, model, 8))["ttft_s"])

    return asyncio.run(run())


def following(url: str, model: str, seconds: float = 8.0) -> list[list[float]]:
    """[seconds since the first, TTFT] of back-to-back requests for ``seconds`` right after a
    cold start's first answer: the node refills its pool then, beside these requests."""
    start, out = time.monotonic(), []
    while (at := time.monotonic() - start) < seconds:
        out.append([round(at, 3), first_token_s(url, model)])
    return out


# -- phases -------------------------------------------------------------------------------------
def throughput(
    plat: Platform, hf: Path, name: str, tokens: int, compiled: bool, order: tuple[str, ...]
) -> dict[str, Any]:
    """Every concurrency on one system, then the next system in ``order`` (ABBA over systems:
    a system's instance is loaded once per visit, not once per concurrency: on one CPU slot
    each sllm visit is a cold start and the settling after it, ~1-2 min here)."""
    out: dict[str, Any] = {s: {} for s in SYSTEMS}
    for system in order:
        # the peer runs only while measured: its engine and KV cache take GBs this shared
        # machine needs for sllm's instances
        peer = Peer(hf, plat.root, compiled=compiled) if system == "peer" else None
        try:
            if peer is not None:
                peer.wait_ready()
            url, model = (peer.url, peer.model) if peer is not None else (
                plat.url, f"{name}-{'vllm' if system == 'sllm-vllm' else 'tf'}")  # fmt: skip
            first_token_s(url, model)  # warm (and, for sllm, load this function's instance)
            plat.wait_quiet()  # the pool refilled after that load: not measured
            for c in CONCURRENCY:
                per_client = (3 if name == "smollm2" else 1) if c == 1 else 1
                run = asyncio.run(wave(url, model, c, per_client, tokens))
                run["loadavg"] = os.getloadavg()
                out[system].setdefault(str(c), []).append(run)
                print(f"{name} {system} c={c}: {run['tok_s']:.1f} tok/s", flush=True)
        finally:
            if peer is not None:
                peer.stop()
    return out


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Medians and the issue's targets, each judged met or missed."""
    out: dict[str, Any] = {}
    for name, systems in report["throughput"].items():
        for c in map(str, CONCURRENCY):
            if any(c not in systems.get(s, {}) for s in SYSTEMS):
                continue  # a run cut short
            med = {s: statistics.median(r["tok_s"] for r in systems[s][c]) for s in SYSTEMS}
            ratio = med["sllm-vllm"] / med["peer"]
            out[f"{name}_c{c}_tok_s"] = {**med, "vllm_vs_peer": ratio, "target": 0.95,
                                         "met": ratio >= 0.95}  # fmt: skip
    for name, cold in report["coldstart"].items():
        for key in ("vllm_kept_following", "transformers_following"):
            ttfts = [ttft for _, ttft in cold.get(key, [])]
            if ttfts:  # the requests after a cold start, beside the pool's refill
                out[f"{name}_{key}_ttft_s"] = {"n": len(ttfts), "median": statistics.median(ttfts),
                                               "max": max(ttfts)}  # fmt: skip
        # the stricter of the compiled peer's starts (the first compiles, the second has a cache)
        compiled = min(cold["peer_compiled_s"], cold.get("peer_compiled_warm_s", float("inf")))
        limits = {"eager": min(cold["peer_eager_s"] / 10, 4.0), "compiled": compiled / 40}
        for engine in ("kept", "built"):  # the idle vLLM process's engine: this model's, or not
            dram = cold[f"sllm_vllm_dram_{engine}_s"]
            got = cold.get(f"dram_{engine}_engine", "")  # what the instance really got
            for peer, limit in limits.items():
                out[f"{name}_cold_dram_{engine}_vs_{peer}"] = {
                    "sllm_s": dram, "limit_s": limit, "met": dram <= limit,
                    "engine": got}  # fmt: skip
    return out


def coldstart(plat: Platform, hf: Path, name: str, other: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("eager", "compiled", "compiled_warm"):
        peer = Peer(hf, plat.root, compiled=mode != "eager")
        peer.wait_ready()
        out[f"peer_{mode}_s"] = (
            time.monotonic() - peer.started + first_token_s(peer.url, peer.model)
        )
        peer.stop()
    fn = f"{name}-vllm"
    first_token_s(plat.url, fn)  # DRAM, engine kept: the idle process built this model's
    plat.scale_to_zero(fn)
    plat.wait_quiet()
    out["sllm_vllm_dram_kept_s"] = first_token_s(plat.url, fn)
    out["dram_kept_engine"] = plat.last_engine()  # "built" when no warm engine was there
    out["vllm_kept_following"] = following(plat.url, fn)
    # DRAM, engine built: the idle process's engine is another model's (with a pool of two
    # vLLM processes or more, the other process still holds this model's: kept)
    plat.scale_to_zero(fn)
    first_token_s(plat.url, other)
    plat.scale_to_zero(other)
    plat.wait_quiet()
    out["sllm_vllm_dram_built_s"] = first_token_s(plat.url, fn)
    out["dram_built_engine"] = plat.last_engine()
    out["dram_built_timings"] = plat.last_timings()
    plat.scale_to_zero(fn)
    for tier, ssd in (("ssd", True), ("store", False)):
        plat.restart_node(ssd=ssd)
        out[f"sllm_vllm_{tier}_s"] = first_token_s(plat.url, fn)
        out[f"{tier}_timings"] = plat.last_timings()
        plat.scale_to_zero(fn)
    first_token_s(plat.url, f"{name}-tf")  # its checkpoint is in DRAM now
    plat.scale_to_zero(f"{name}-tf")
    plat.wait_quiet()  # the pool refilled, as before the vLLM measurement
    out["sllm_transformers_dram_s"] = first_token_s(plat.url, f"{name}-tf")
    out["transformers_following"] = following(plat.url, f"{name}-tf")
    plat.scale_to_zero(f"{name}-tf")
    return out


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # through every finally: peers and the platform stop cleanly


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_signal)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--phases", default="throughput,coldstart")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--peer-compiled", action="store_true", help="throughput peer compiled")
    parser.add_argument(
        "--order", default="peer,sllm-vllm,sllm-transformers,sllm-vllm,peer",
        help="systems in measuring order (default: peer and sllm+vLLM ABBA, transformers once)",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-pool-size", type=int, default=1,
        help="the node's pre-started vLLM processes (SLLM_VLLM_POOL_SIZE); each keeps the "
        "engine of one of the models loaded last",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-spare", type=int, default=1,
        help="the node's vLLM processes kept without an engine (SLLM_VLLM_SPARE)",
    )  # fmt: skip
    args = parser.parse_args()
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    hf = build_models()
    models = [m for m in args.models.split(",") if m]
    order = tuple(s for s in args.order.split(",") if s)
    assert set(order) == set(SYSTEMS), f"--order must name each of {SYSTEMS}"
    root = DATA / "run"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    plat = Platform(root, args.vllm_pool_size, args.vllm_spare)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
                              "vllm_pool_size": args.vllm_pool_size,
                              "vllm_spare": args.vllm_spare,
                              "throughput": {}, "coldstart": {}}  # fmt: skip
    try:
        for name in MODELS:
            ckpt = DATA / f"ckpt-{name}"
            if not ckpt.exists():
                convert_checkpoint(hf[name], ckpt)
            key = f"checkpoints/{name}/bench"
            push_checkpoint(ckpt, LocalStore(plat.store), key)
            memory = "4Gi" if name == "llama1b" else "2Gi"
            plat.deploy(f"{name}-vllm", key, "vllm", memory)
            plat.deploy(f"{name}-tf", key, "transformers", memory)
        for name in models:
            tokens = 64 if name == "llama1b" else 128
            if "throughput" in args.phases:
                report["throughput"][name] = throughput(plat, hf[name], name, tokens,
                                                        args.peer_compiled, order)  # fmt: skip
            if "coldstart" in args.phases:
                other = next(f"{m}-vllm" for m in MODELS if m != name)
                report["coldstart"][name] = coldstart(plat, hf[name], name, other)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        report["machine"]["loadavg_end"] = os.getloadavg()
        report["order"] = list(order)
        report["summary"] = summary(report) if report["throughput"] or report["coldstart"] else {}
        args.json.write_text(json.dumps(report, indent=2))
        plat.close()
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
