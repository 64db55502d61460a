"""The contenders of bench/load.py, each run in a process of its own (``bench/load.py --child``).

A child imports what it needs and does its untimed set-up (a node's start-up for sllm: the
SSD tier opened, one DRAM slab preallocated; the model class built once where a model is
built), prints ``ready``, waits for ``go`` on stdin (the parent drops or warms the page cache
in between), loads, and prints one JSON line: ``seconds`` (load until every byte is in this
process's memory, or for sllm in the node's DRAM tier, and every page touched), the peak RSS
of the load (``VmHWM`` reset with ``clear_refs`` before it, minus the RSS before it, plus for
sllm the preallocated slab it loads into) and contender-specific parts.

- ``sllm``: ``TieredCache.fetch`` of the checkpoint from the SSD tier: the node's SSD -> DRAM
  hop, the same code that serves (``runtime.loader.read.read_checkpoint`` into the DRAM
  entry). Every byte is written into the DRAM image by the reads. ``views_touched_s``: then
  the entry's tensors as views (``entry_tensors``) with every page touched, as an instance
  does with its mapping; ``ready_s`` in ``sllm_ready``: fetch + model built from the views.
  ``sllm_fresh``: the same without the preallocated slab (fresh shared memory).
- ``safetensors``: ``safetensors.torch.load_file``; ``fastsafetensors``:
  ``SafeTensorsFileLoader`` (CPU, no GDS) + ``get_tensor`` of every tensor; ``runai``:
  ``SafetensorsStreamer`` + a copy of each yielded tensor (they are views of the streamer's
  reused buffers, so a consumer on CPU copies them, as vLLM copies them into its parameters);
  ``tensorizer``: ``TensorDeserializer`` (eager) of the same weights serialized by tensorizer;
  ``torch_mmap``: ``torch.load(mmap=True)``. Then every page of every tensor is touched.
- ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained`` + every parameter page touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _load_data import SSD_KEY, ssd_root, tensorizer_file, touch_pages


def _rss() -> int:
    return _status("VmRSS")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    # Linux 4.0+: "5" resets the peak RSS (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5\n")


class Child:
    def __init__(self, name: str, hf: Path, pt: Path, ckpt: Path) -> None:
        self.name, self.hf, self.pt, self.ckpt = name, hf, pt, ckpt
        self.cache: Any = None
        self.dram_root: Path | None = None
        self.held_rss = 0  # memory set up for the load before it (sllm's slab)

    def setup(self) -> None:
        import torch

        torch.set_num_threads(2)
        if self.name.startswith("sllm"):
            import os

            from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
            from runtime.ckpt.index import image_layout, read_index

            size = image_layout(read_index(self.ckpt))[1]
            self.dram_root = Path("/dev/shm") / f"sllm-bench-load-{os.getpid()}"
            dram = DramCache(self.dram_root, 2 * size + (64 << 20))
            if self.name != "sllm_fresh":
                # a node's start-up: one slab, mapped and written once; its pages are the
                # load's memory, so they count in its peak RSS (``held_rss``)
                rss = _rss()
                dram.preallocate(size)
                self.held_rss = _rss() - rss
            ssd = SsdCache(ssd_root(self.ckpt), 4 * size)
            self.cache = TieredCache(_NoStore(), ssd, dram, BandwidthEstimator())
        if self.name in ("sllm_ready", "from_pretrained"):
            from runtime.loader.model import build_skeleton

            build_skeleton(self.ckpt)  # the model class's first use, as a pool process has

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self.dram_root is not None:
            shutil.rmtree(self.dram_root, ignore_errors=True)

    def load(self) -> dict[str, Any]:
        before = _rss()
        _reset_peak()
        began = time.perf_counter()
        extra = getattr(self, "_" + self.name)()
        seconds = time.perf_counter() - began
        peak = _status("VmHWM")
        result: dict[str, Any] = {
            "seconds": seconds,
            "peak_rss_bytes": peak - before + self.held_rss,
            "peak_rss_process_bytes": peak,
        }
        result.update(extra.get("parts", {}))
        if "after" in extra:  # work after the load proper, timed apart (not in seconds)
            result.update(extra["after"]())
        return result

    # ---- contenders: each returns {"parts": {...}} and optionally "after" -----------------
    def _fetch(self) -> dict[str, Any]:
        result = self.cache.fetch(SSD_KEY)
        assert result.tier == "ssd", result.tier
        return {"parts": {"tier": result.tier}, "after": lambda: self._views_touched(result)}

    _sllm = _fetch
    _sllm_fresh = _fetch

    def _views_touched(self, result: Any) -> dict[str, Any]:
        from runtime.loader.cpu import entry_tensors

        t0 = time.perf_counter()
        entry = entry_tensors(result.directory)
        touch_pages(list(entry.tensors.values()))
        views_s = time.perf_counter() - t0
        entry.close()
        self.cache.release(SSD_KEY)
        return {"views_touched_s": views_s}

    def _sllm_ready(self) -> dict[str, Any]:
        """Model ready from SSD, cold: the node's fetch, then the instance's build from the
        DRAM entry's views (skeleton on meta, tensors assigned), every parameter page touched."""
        from runtime.loader.cpu import entry_tensors
        from runtime.loader.model import build_model

        t0 = time.perf_counter()
        result = self.cache.fetch(SSD_KEY)
        t1 = time.perf_counter()
        entry = entry_tensors(result.directory)
        model = build_model(result.directory, entry.tensors)
        t2 = time.perf_counter()
        touch_pages(list(model.parameters()))
        t3 = time.perf_counter()
        return {"parts": {"read_s": t1 - t0, "build_s": t2 - t1, "touch_s": t3 - t2}}

    def _from_pretrained(self) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(self.hf, dtype=torch.bfloat16)
        t1 = time.perf_counter()
        touch_pages(list(model.parameters()))
        return {"parts": {"load_s": t1 - t0, "touch_s": time.perf_counter() - t1}}

    def _safetensors(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        self._keep = load_file(str(self.hf / "model.safetensors"))
        touch_pages(list(self._keep.values()))
        return {}

    def _fastsafetensors(self) -> dict[str, Any]:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), device="cpu", nogds=True)
        loader.add_filenames({0: [str(self.hf / "model.safetensors")]})
        buffers = loader.copy_files_to_device()
        self._keep = {k: buffers.get_tensor(k) for k in loader.get_keys()}
        touch_pages(list(self._keep.values()))
        self._closers = [buffers.close, loader.close]
        return {}

    def _runai(self) -> dict[str, Any]:
        from runai_model_streamer import SafetensorsStreamer

        keep = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(self.hf / "model.safetensors"))
            for name, tensor in streamer.get_tensors():
                keep[name] = tensor.clone()
        touch_pages(list(keep.values()))
        self._keep = keep
        return {}

    def _tensorizer(self) -> dict[str, Any]:
        from tensorizer import TensorDeserializer

        deserializer = TensorDeserializer(str(tensorizer_file(self.ckpt)), device="cpu")
        self._keep = {k: deserializer[k] for k in deserializer}
        touch_pages(list(self._keep.values()))
        self._closers = [deserializer.close]
        return {}

    def _torch_mmap(self) -> dict[str, Any]:
        import torch

        self._keep = torch.load(self.pt / "pytorch_model.bin", mmap=True, weights_only=True)
        touch_pages(list(self._keep.values()))
        return {}


class _NoStore:
    """The bench's tier has the checkpoint on SSD: a fetch that reached the store is a bug."""

    concurrency = 1
    part_size = 1 << 20

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"bench store: {name} called, the checkpoint should be on SSD")


def child_main(name: str, hf: Path, pt: Path, ckpt: Path) -> int:
    child = Child(name, hf, pt, ckpt)
    try:
        child.setup()
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        print(json.dumps(child.load()), flush=True)
    finally:
        child.close()
    return 0
