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
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _backends_setup import DATA, MODELS, Peer, Platform, build_models, deploy_models  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
CONCURRENCY = (1, 8, 32)
SYSTEMS = ("peer", "sllm-vllm", "sllm-transformers")


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
        limits = peer_limits(cold["peer_eager_s"], compiled)
        for engine in ("kept", "built"):  # the idle vLLM process's engine: this model's, or not
            dram = cold[f"sllm_vllm_dram_{engine}_s"]
            got = cold.get(f"dram_{engine}_engine", "")  # what the instance really got
            for peer, limit in limits.items():
                out[f"{name}_cold_dram_{engine}_vs_{peer}"] = {
                    "sllm_s": dram, "limit_s": limit, "met": dram <= limit,
                    "engine": got}  # fmt: skip
    return out


def peer_start_s(hf: Path, root: Path, *, compiled: bool) -> float:
    """The peer's start to its first token: process start, ready, one streamed request."""
    peer = Peer(hf, root, compiled=compiled)
    try:
        peer.wait_ready()
        return time.monotonic() - peer.started + first_token_s(peer.url, peer.model)
    finally:
        peer.stop()


def peer_limits(eager_s: float, compiled_s: float) -> dict[str, float]:
    """The issue's cold-start limits: 1/10 of the eager start (at most 4 s), 1/40 of the
    compiled one."""
    return {"eager": min(eager_s / 10, 4.0), "compiled": compiled_s / 40}


def coldstart(plat: Platform, hf: Path, name: str, other: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("eager", "compiled", "compiled_warm"):
        out[f"peer_{mode}_s"] = peer_start_s(hf, plat.root, compiled=mode != "eager")
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


def stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # through every finally: peers and the platform stop cleanly


def main() -> int:
    signal.signal(signal.SIGTERM, stop_on_signal)
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
        deploy_models(plat, hf)
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
