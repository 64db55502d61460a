"""Checkpoint loading benchmark (issues 2 and 15): sllm's SSD -> DRAM load, the code that serves,
against the disk's limit measured by fio and against its peers (safetensors, fastsafetensors,
Run:ai model streamer, tensorizer), cold and warm, in one run.

    .venv/bin/python bench/load.py --size-gb 2 --runs 4 --json bench/.data/load.json

Builds (once, under bench/.data/) a random Llama-shaped bf16 checkpoint of about N GB as HF
safetensors, pytorch_model.bin, tensorizer and sllm files (the last also as an SSD-tier entry).
Every measurement runs in a fresh process (bench/_load_peers.py says what each contender does);
the parent drops the page cache (``echo 3 > /proc/sys/vm/drop_caches`` as root, else
posix_fadvise DONTNEED: ``cold_method``) or reads the contender's files just before ("warm"),
then lets it go. Contenders run in ABBA order: rounds alternate forward, backward, backward,
forward, so each follows each other equally often. ``fio`` (installed with apt-get when
missing) reads the sllm partitions with O_DIRECT and libaio in two job shapes; the limit of a
round is the faster. ``memcpy`` (512 MiB between touched buffers) is the warm limit. Figures are
medians over rounds; ratios are per round, then the median (``paired_ratios``), and targets are
judged on those. The load average is recorded beside every sample.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _load_data import (
    drop_caches,
    ensure_checkpoint,
    ensure_fio,
    fio_read,
    load_average,
    memcpy_gbps,
    tensorizer_file,
)

PEERS = ("safetensors", "fastsafetensors", "runai", "tensorizer")
COLD = ("fio", "sllm", *PEERS, "torch_mmap", "sllm_fresh")
WARM = ("sllm", *PEERS)
READY = ("sllm_ready", "from_pretrained")
# Issue 15's targets, on this machine, ratios within one run (paired per round).
TARGETS = {
    "sllm_vs_limit_cold": 0.95,
    "sllm_vs_best_peer_cold": 1.05,
    "sllm_warm_vs_memcpy": 0.9,
    "peak_rss_vs_checkpoint_max": 1.05,
}


class Run:
    def __init__(self, size_gb: float) -> None:
        from runtime.ckpt.index import read_index

        self.size_gb = size_gb
        self.fio = ensure_fio()
        self.hf, self.pt, self.ckpt = ensure_checkpoint(size_gb)
        self.index = read_index(self.ckpt)
        self.parts = [self.ckpt / p.file for p in self.index.partitions]
        st = self.hf / "model.safetensors"
        self.files = {
            "sllm": self.parts,
            "sllm_fresh": self.parts,
            "sllm_ready": self.parts,
            "safetensors": [st],
            "fastsafetensors": [st],
            "runai": [st],
            "tensorizer": [tensorizer_file(self.ckpt)],
            "torch_mmap": [self.pt / "pytorch_model.bin"],
            "from_pretrained": [st],
        }
        self.nbytes = {k: sum(p.stat().st_size for p in v) for k, v in self.files.items()}
        self.all_files = sorted({p for v in self.files.values() for p in v})
        self.samples: dict[str, list[Any]] = {}
        self.cold_method = ""

    def record(self, key: str, value: Any) -> None:
        self.samples.setdefault(key, []).append(value)

    def warm(self, paths: list[Path]) -> None:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass

    def child(self, name: str, cold: bool) -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", name, "--size-gb", str(self.size_gb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{name}: child said {line!r} instead of ready")
            if cold:
                self.cold_method = drop_caches(self.all_files)
            else:
                self.warm(self.files[name])
                self.record(f"{name}_warm_resident_fraction", resident(self.files[name]))
            self.record(f"{name}_{'cold' if cold else 'warm'}_load_average", load_average())
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result: dict[str, Any] = json.loads(proc.stdout.readline())
        finally:
            proc.stdin.close()
            if proc.wait(timeout=300) != 0:
                raise RuntimeError(f"{name}: child exited with {proc.returncode}")
        return result

    def measure(self, name: str, cold: bool) -> None:
        mode = "cold" if cold else "warm"
        if name == "fio":
            self.cold_method = drop_caches(self.all_files)
            self.record("fio_cold_load_average", load_average())
            shapes = fio_read(self.fio, self.parts)
            for k, v in shapes.items():
                self.record(f"{k}_cold_s", v)
            self.record("limit_cold_s", min(shapes.values()))
            return
        result = self.child(name, cold)
        self.record(f"{name}_{mode}_s", result.pop("seconds"))
        for key, value in result.items():
            self.record(f"{name}_{mode}_{key}", value)

    def round(self, r: int, runs: int) -> None:
        flip = r % 4 in (1, 2)  # ABBA: forward, backward, backward, forward, ...

        def order(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(reversed(names)) if flip else names

        print(f"round {r + 1}/{runs} ({'B' if flip else 'A'})", file=sys.stderr)
        for name in order(COLD):
            self.measure(name, cold=True)
        for name in order(READY):
            self.measure(name, cold=True)
        for name in order(WARM):
            self.measure(name, cold=False)
        self.record("memcpy_gbps", memcpy_gbps())


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


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize(run: Run, runs: int) -> dict[str, Any]:
    s, nb = run.samples, run.nbytes
    m = {k: median(v) for k, v in s.items() if v and isinstance(v[0], int | float)}
    ckpt_bytes = run.index.total_bytes

    def gbps(name: str, mode: str) -> float:
        return float(nb[name] / m[f"{name}_{mode}_s"] / 1e9)

    def per_round(name: str, mode: str) -> list[float]:
        return [nb[name] / t / 1e9 for t in s[f"{name}_{mode}_s"]]

    limit = [ckpt_bytes / t / 1e9 for t in s["limit_cold_s"]]
    sllm = per_round("sllm", "cold")
    touched = [
        nb["sllm"] / (t + v) / 1e9
        for t, v in zip(s["sllm_cold_s"], s["sllm_cold_views_touched_s"], strict=True)
    ]
    best_peer = [max(per_round(p, "cold")[i] for p in PEERS) for i in range(runs)]
    paired = {
        "sllm_vs_limit_cold": median([a / b for a, b in zip(sllm, limit, strict=True)]),
        "sllm_vs_best_peer_cold": median([a / b for a, b in zip(sllm, best_peer, strict=True)]),
        "sllm_touched_vs_best_peer_cold": median(
            [a / b for a, b in zip(touched, best_peer, strict=True)]
        ),
        "sllm_warm_vs_memcpy": median(
            [a / b for a, b in zip(per_round("sllm", "warm"), s["memcpy_gbps"], strict=True)]
        ),
        "ready_speedup_cold": median(
            [
                a / b
                for a, b in zip(s["from_pretrained_cold_s"], s["sllm_ready_cold_s"], strict=True)
            ]
        ),
        "peak_rss_vs_checkpoint_max": m["sllm_cold_peak_rss_bytes"] / ckpt_bytes,
    }
    peers = {
        p: {
            "cold_gbps": gbps(p, "cold"),
            "warm_gbps": gbps(p, "warm"),
            "peak_rss_bytes": int(m[f"{p}_cold_peak_rss_bytes"]),
            "vs_limit_cold": gbps(p, "cold") / (ckpt_bytes / m["limit_cold_s"] / 1e9),
            "sllm_vs_it_cold": median(
                [a / b for a, b in zip(sllm, per_round(p, "cold"), strict=True)]
            ),
        }
        for p in PEERS
    }
    result: dict[str, Any] = {
        "checkpoint_bytes": ckpt_bytes,
        "limit_tool": "fio",
        "limit_cold_gbps": ckpt_bytes / m["limit_cold_s"] / 1e9,
        "limit_shapes_cold_gbps": {
            k[: -len("_cold_s")]: ckpt_bytes / v / 1e9
            for k, v in m.items()
            if k.startswith("fio_") and k.endswith("_cold_s")
        },
        "sllm_cold_gbps": gbps("sllm", "cold"),
        "sllm_touched_cold_gbps": median(touched),
        "sllm_fresh_cold_gbps": gbps("sllm_fresh", "cold"),
        "sllm_warm_gbps": gbps("sllm", "warm"),
        "memcpy_gbps": m["memcpy_gbps"],
        "safetensors_cold_gbps": peers["safetensors"]["cold_gbps"],
        "safetensors_warm_gbps": peers["safetensors"]["warm_gbps"],
        "torch_mmap_cold_gbps": gbps("torch_mmap", "cold"),
        "peers": peers,
        "best_peer_cold_gbps": max(p["cold_gbps"] for p in peers.values()),
        "ready_sllm_cold_s": m["sllm_ready_cold_s"],
        "ready_from_pretrained_cold_s": m["from_pretrained_cold_s"],
        "ready_breakdown_s": {
            k: v
            for k, v in m.items()
            if k.startswith(("sllm_ready_cold_", "from_pretrained_cold_")) and k.endswith("_s")
        },
        "model_steps_s": {
            "views_touched_s": m["sllm_cold_views_touched_s"],
            "build_s": m["sllm_ready_cold_build_s"],
        },
        "peak_rss_bytes": int(m["sllm_cold_peak_rss_bytes"]),
        "peak_rss_process_bytes": int(m["sllm_cold_peak_rss_process_bytes"]),
        "cold_method": run.cold_method,
        "runs": runs,
        "paired_ratios": paired,
        "samples": s,
    }
    result["ratios"] = {
        "sllm_vs_limit_cold": result["sllm_cold_gbps"] / result["limit_cold_gbps"],
        "sllm_vs_best_peer_cold": result["sllm_cold_gbps"] / result["best_peer_cold_gbps"],
        "sllm_warm_vs_memcpy": result["sllm_warm_gbps"] / result["memcpy_gbps"],
        "ready_speedup_cold": result["ready_from_pretrained_cold_s"] / result["ready_sllm_cold_s"],
        "peak_rss_vs_checkpoint_max": result["peak_rss_bytes"] / ckpt_bytes,
    }
    result["targets"] = {
        k: {
            "target": t,
            "value": round(paired[k], 3),
            "met": paired[k] <= t if k.endswith("_max") else paired[k] >= t,
        }
        for k, t in TARGETS.items()
    }
    return result


def cuda_figures(run: Run, runs: int) -> dict[str, Any]:
    """DRAM entry -> device through the instance's pipelined copy, where CUDA exists."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA on this machine: the CUDA path not measured"}
    from runtime.loader.cpu import entry_tensors
    from runtime.loader.cuda import image_to_device
    from tests.loaded import dram_entry

    shm = Path("/dev/shm") / f"sllm-bench-cuda-{os.getpid()}"
    try:
        entry = entry_tensors(dram_entry(run.ckpt, shm))
        seconds, modes = [], set()
        for _ in range(runs):
            placed = image_to_device(entry.index, entry.image, "cuda:0")
            seconds.append(placed.stats.seconds)
            modes.add(placed.stats.mode)
            del placed
            torch.cuda.empty_cache()
        entry.close()
    finally:
        import shutil

        shutil.rmtree(shm, ignore_errors=True)
    return {
        "available": True,
        "device": torch.cuda.get_device_name(0),
        "dram_to_device_gbps": run.index.total_bytes / median(seconds) / 1e9,
        "modes": sorted(modes),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--runs", type=int, default=4, help="rounds (>= 4, a multiple of 2: ABBA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from _load_peers import child_main

        hf, pt, ckpt = ensure_checkpoint(args.size_gb)
        return child_main(args.child, hf, pt, ckpt)
    if args.runs < 4 or args.runs % 2:
        ap.error("--runs must be an even number >= 4 (ABBA order, medians)")

    import torch

    run = Run(args.size_gb)
    print(f"checkpoint: {run.index.total_bytes / 1e9:.2f} GB", file=sys.stderr)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = load_average()
    for r in range(args.runs):
        run.round(r, args.runs)
    result = summarize(run, args.runs)
    result["cuda"] = cuda_figures(run, args.runs)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_start_end": [load_before, load_average()],
    }
    result["timestamp"] = started
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
