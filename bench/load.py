"""Checkpoint loading benchmark (issue 2): the sllm loader against the disk's limit, safetensors,
torch.load(mmap=True) and transformers' from_pretrained, cold and warm, in one run.

    .venv/bin/python bench/load.py --size-gb 2 --json bench/.data/load.json

Builds (once, under bench/.data/) a random Llama-shaped bf16 checkpoint of about N GB as HF
safetensors, as pytorch_model.bin and in the sllm format. Every figure is the median of
``--runs`` runs (>= 3) with the loaders alternating order between runs. "Cold" = page cache
dropped before each measurement (/proc/sys/vm/drop_caches as root, else posix_fadvise
DONTNEED; the JSON's ``cold_method`` says which); "warm" = the files were read just before.

- ``limit``: the same partition bytes read with the loader's I/O pattern (O_DIRECT, 16 MiB,
  4 in flight) into small reused buffers: what the disk gives.
- ``sllm``: ``read_image`` into a pre-touched image (the node's buffer pool) + tensor views;
  ``sllm_fresh``: ``load_checkpoint`` allocating its image during the load.
- ``safetensors``: ``safetensors.torch.load_file`` then one byte of every page read;
  ``torch_mmap``: ``torch.load(mmap=True)`` then every page read.
- ``ready_sllm``: ``load_model`` into the pool image: reads, with the meta skeleton built on a
  side thread meanwhile, then views + assign;
  ``ready_from_pretrained``: ``from_pretrained`` + every parameter page read (it maps lazily).
- ``peak_rss_bytes``: in a fresh process, peak RSS during ``load_checkpoint`` + ``build_model``
  minus the RSS before it (imports excluded); ``peak_rss_process_bytes`` is the absolute peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _load_data import (
    drop_caches,
    ensure_checkpoint,
    files_of,
    memcpy_gbps,
    raw_read,
    touch_pages,
)

TARGETS = {
    "sllm_vs_limit_cold": 0.9,
    "sllm_vs_safetensors_cold": 1.3,
    "sllm_warm_vs_memcpy": 0.8,
    "ready_speedup_cold": 1.3,
    "peak_rss_vs_checkpoint_max": 1.15,
}


def rss_probe(ckpt: Path) -> None:
    """Child mode: print peak RSS figures of load_checkpoint + build_model as JSON."""
    import psutil

    from runtime.loader.cpu import load_checkpoint
    from runtime.loader.model import build_model, load_config

    load_config(ckpt)  # imports and model-class set-up happen before the baseline
    before = psutil.Process().memory_info().rss
    loaded = load_checkpoint(ckpt)
    model = build_model(ckpt, loaded.tensors)
    # VmHWM (peak RSS of this address space), not ru_maxrss: the latter survives exec and can
    # report the parent's RSS from before the fork.
    peak = _vm_hwm()
    print(
        json.dumps(
            {"before": before, "peak": peak, "params": sum(p.numel() for p in model.parameters())}
        )
    )


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Bench:
    def __init__(self, hf: Path, pt: Path, ckpt: Path) -> None:
        from runtime.ckpt.index import image_layout, read_index
        from runtime.loader.cpu import allocate_image

        self.hf, self.pt, self.ckpt = hf, pt, ckpt
        self.index = read_index(ckpt)
        self.parts = [ckpt / p.file for p in self.index.partitions]
        self.all_files = [*self.parts, *files_of(hf, (".safetensors",)), *files_of(pt, (".bin",))]
        self.pool = allocate_image(image_layout(self.index)[1])  # touched once, like a node's pool
        self.samples: dict[str, list[float]] = {}
        self.cold_method = ""

    def record(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def cold(self) -> None:
        self.cold_method = drop_caches(self.all_files)

    def warm(self, paths: list[Path]) -> None:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass

    # ---- loaders: each returns seconds ------------------------------------------------
    def limit(self) -> float:
        return raw_read(self.parts)

    def sllm(self) -> float:
        from runtime.loader.cpu import read_image, tensor_views

        began = time.perf_counter()
        read_image(self.ckpt, self.index, self.pool)
        tensor_views(self.index, self.pool)
        return time.perf_counter() - began

    def sllm_fresh(self) -> float:
        from runtime.loader.cpu import load_checkpoint

        began = time.perf_counter()
        loaded = load_checkpoint(self.ckpt)
        seconds = time.perf_counter() - began
        del loaded
        return seconds

    def safetensors(self) -> float:
        from safetensors.torch import load_file

        began = time.perf_counter()
        state = load_file(str(self.hf / "model.safetensors"))
        touch_pages(list(state.values()))
        seconds = time.perf_counter() - began
        del state
        return seconds

    def torch_mmap(self) -> float:
        import torch

        began = time.perf_counter()
        state = torch.load(self.pt / "pytorch_model.bin", mmap=True, weights_only=True)
        touch_pages(list(state.values()))
        seconds = time.perf_counter() - began
        del state
        return seconds

    def ready_sllm(self) -> float:
        from runtime.loader.model import load_model

        t0 = time.perf_counter()
        loaded, model = load_model(self.ckpt, image=self.pool)
        touch_pages(list(model.parameters()))
        seconds = time.perf_counter() - t0
        # the meta skeleton is built on a side thread during the reads
        self.record("ready_sllm_read_s", loaded.stats.seconds)
        self.record("ready_sllm_after_read_s", seconds - loaded.stats.seconds)
        del model, loaded
        return seconds

    def ready_from_pretrained(self) -> float:
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.bfloat16)
        t1 = time.perf_counter()
        touch_pages(list(model.parameters()))
        t2 = time.perf_counter()
        self.record("ready_from_pretrained_load_s", t1 - t0)
        self.record("ready_from_pretrained_touch_s", t2 - t1)
        del model
        return t2 - t0


def cuda_figures(bench: Bench, runs: int) -> dict[str, Any]:
    """Directory -> device (cold) and pinned DRAM image -> device, when CUDA exists."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA on this machine: CUDA loader not measured"}
    from runtime.loader.cuda import image_to_cuda, load_to_cuda, pin_image, unpin_image

    nbytes = bench.index.total_bytes
    cold, pinned = [], []
    pinned_ok = pin_image(bench.pool)
    for _ in range(runs):
        bench.cold()
        cold.append(load_to_cuda(bench.ckpt).stats.seconds)
        torch.cuda.empty_cache()
        pinned.append(image_to_cuda(bench.index, bench.pool).stats.seconds)
        torch.cuda.empty_cache()
    if pinned_ok:
        unpin_image(bench.pool)
    return {
        "available": True,
        "device": torch.cuda.get_device_name(),
        "dir_to_device_cold_gbps": nbytes / median(cold) / 1e9,
        "dram_to_device_gbps": nbytes / median(pinned) / 1e9,
        "dram_image_pinned": pinned_ok,
    }


def resident(paths: list[Path]) -> float:
    """Fraction of the pages of ``paths`` in the page cache."""
    from runtime.loader.direct_io import page_residency

    cached = total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            vec = page_residency(fd, p.stat().st_size) or b""
        finally:
            os.close(fd)
        cached += len(vec) - vec.count(0)
        total += len(vec)
    return cached / total if total else 0.0


def paired(samples: dict[str, list[float]], nbytes: int) -> dict[str, float]:
    """Ratios computed within each run, then the median: robust to drifts between runs."""

    def per_run(f: Callable[[int], float]) -> float:
        return median([f(i) for i in range(len(samples["sllm_cold_s"]))])

    return {
        "sllm_vs_limit_cold": per_run(
            lambda i: samples["limit_cold_s"][i] / samples["sllm_cold_s"][i]
        ),
        "sllm_warm_vs_memcpy": per_run(
            lambda i: nbytes / samples["sllm_warm_s"][i] / 1e9 / samples["memcpy_gbps"][i]
        ),
        "ready_speedup_cold": per_run(
            lambda i: samples["ready_from_pretrained_cold_s"][i] / samples["ready_sllm_cold_s"][i]
        ),
    }


def model_steps(bench: Bench) -> dict[str, float]:
    """Seconds of each CPU step after the reads, measured one by one (warm, image loaded)."""
    from runtime.loader.cpu import tensor_views
    from runtime.loader.model import assign_tensors, build_skeleton

    t0 = time.perf_counter()
    views = tensor_views(bench.index, bench.pool)
    t1 = time.perf_counter()
    skeleton = build_skeleton(bench.ckpt)
    t2 = time.perf_counter()
    assign_tensors(skeleton, bench.ckpt, views)
    t3 = time.perf_counter()
    return {"views_s": t1 - t0, "meta_skeleton_s": t2 - t1, "assign_s": t3 - t2}


def run_round(bench: Bench, cold: list[tuple[str, Callable[[], float]]], flip: bool) -> None:
    for key, fn in reversed(cold) if flip else cold:
        bench.cold()
        bench.record(key, fn())


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (>= 3)")
    ap.add_argument("--rss-probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return 0
    if args.runs < 3:
        ap.error("--runs must be at least 3 (figures are medians)")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf, pt, ckpt = ensure_checkpoint(args.size_gb)
    bench = Bench(hf, pt, ckpt)
    nbytes = bench.index.total_bytes
    st_bytes = (hf / "model.safetensors").stat().st_size
    pt_bytes = (pt / "pytorch_model.bin").stat().st_size
    print(f"checkpoint: {nbytes / 1e9:.2f} GB in {len(bench.parts)} partitions", file=sys.stderr)

    # untimed warm-up of both ready paths (first use of the model classes costs ~2 s here)
    bench.ready_sllm()
    bench.ready_from_pretrained()
    bench.samples.clear()

    loaders = [
        ("limit_cold_s", bench.limit),
        ("sllm_cold_s", bench.sllm),
        ("safetensors_cold_s", bench.safetensors),
        ("torch_mmap_cold_s", bench.torch_mmap),
        ("sllm_fresh_cold_s", bench.sllm_fresh),
    ]
    ready = [
        ("ready_sllm_cold_s", bench.ready_sllm),
        ("ready_from_pretrained_cold_s", bench.ready_from_pretrained),
    ]
    for r in range(args.runs):
        print(f"run {r + 1}/{args.runs}", file=sys.stderr)
        run_round(bench, loaders, flip=bool(r % 2))
        run_round(bench, ready, flip=bool(r % 2))
        # warm: files read just before; residency recorded because other processes dropping
        # the page cache (shared machine) would turn a "warm" read cold
        bench.warm(bench.parts)
        bench.record("warm_resident_fraction", resident(bench.parts))
        bench.record("sllm_warm_s", bench.sllm())
        bench.record("memcpy_gbps", memcpy_gbps())
        bench.warm([hf / "model.safetensors"])
        bench.record("safetensors_warm_s", bench.safetensors())

    steps = [model_steps(bench) for _ in range(args.runs)]
    cuda = cuda_figures(bench, args.runs)
    probe = subprocess.run(
        [sys.executable, __file__, "--rss-probe", str(ckpt)],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(probe.stdout.strip().splitlines()[-1])

    m = {k: median(v) for k, v in bench.samples.items()}
    result: dict[str, Any] = {
        "checkpoint_bytes": nbytes,
        "limit_cold_gbps": nbytes / m["limit_cold_s"] / 1e9,
        "sllm_cold_gbps": nbytes / m["sllm_cold_s"] / 1e9,
        "sllm_fresh_cold_gbps": nbytes / m["sllm_fresh_cold_s"] / 1e9,
        "safetensors_cold_gbps": st_bytes / m["safetensors_cold_s"] / 1e9,
        "torch_mmap_cold_gbps": pt_bytes / m["torch_mmap_cold_s"] / 1e9,
        "memcpy_gbps": m["memcpy_gbps"],
        "sllm_warm_gbps": nbytes / m["sllm_warm_s"] / 1e9,
        "safetensors_warm_gbps": st_bytes / m["safetensors_warm_s"] / 1e9,
        "ready_sllm_cold_s": m["ready_sllm_cold_s"],
        "ready_from_pretrained_cold_s": m["ready_from_pretrained_cold_s"],
        "ready_breakdown_s": {
            k: v for k, v in m.items() if k.startswith("ready_") and k.count("_") > 3
        },
        "model_steps_s": {k: median([s[k] for s in steps]) for k in steps[0]},
        "cuda": cuda,
        "peak_rss_bytes": rss["peak"] - rss["before"],
        "peak_rss_process_bytes": rss["peak"],
        "cold_method": bench.cold_method,
        "runs": args.runs,
        "samples": bench.samples,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ratios = {
        "sllm_vs_limit_cold": result["sllm_cold_gbps"] / result["limit_cold_gbps"],
        "sllm_vs_safetensors_cold": result["sllm_cold_gbps"] / result["safetensors_cold_gbps"],
        "sllm_warm_vs_memcpy": result["sllm_warm_gbps"] / result["memcpy_gbps"],
        "ready_speedup_cold": result["ready_from_pretrained_cold_s"] / result["ready_sllm_cold_s"],
        "peak_rss_vs_checkpoint_max": result["peak_rss_bytes"] / nbytes,
    }
    result["ratios"] = ratios
    result["paired_ratios"] = paired(bench.samples, nbytes)
    result["targets"] = {
        k: {
            "target": t,
            "value": round(ratios[k], 3),
            "met": ratios[k] <= t if k.endswith("_max") else ratios[k] >= t,
        }
        for k, t in TARGETS.items()
    }
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
