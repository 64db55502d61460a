"""Does an engine kept initialised pay? (issue 13, item 3) One vLLM process, the demo model
(SmolLM2-135M-Instruct, bf16) as a DRAM entry, eager, in-process engine core:

- ``build_s``: ``LLMEngine`` built with the sllm_dram load format (profile run, KV cache
  allocation, weights copied from the DRAM image), then ``first_token_s`` of a one-token
  generation: what a load from a pre-started vLLM process (imports done) pays;
- ``rebuild_s``: a second engine built in the same process after the first was dropped;
- ``reload_s``: weights replaced in place in a built engine (vLLM's ``reload_weights`` fed
  the DRAM image's views) plus ``reset_prefix_cache`` (KV blocks computed with the old
  weights must not be reused), then ``first_token_s`` again: what a load into an engine kept
  initialised for the same model configuration would pay.

    .venv/bin/python bench/vllm_engine_reuse.py --json bench/.data/vllm_engine_reuse.json

Each measured ``--repeats`` times (medians reported); the load average is recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "bench" / ".data" / "vllm_reuse"


def dram_entry(checkpoint: Path, dst: Path) -> Path:
    """A DRAM-tier entry of ``checkpoint`` (its files plus the image the node's tier holds)."""
    from runtime.ckpt.index import image_layout, read_index

    if (dst / "image.bin").exists():
        return dst
    shutil.copytree(checkpoint, dst, dirs_exist_ok=True)
    index = read_index(dst)
    starts, size = image_layout(index)
    with open(dst / "image.bin", "wb") as f:
        f.truncate(size)
        for start, part in zip(starts, index.partitions, strict=True):
            f.seek(start)
            f.write((dst / part.file).read_bytes())
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from runtime.backend.vllm_process import prepare_environment

    prepare_environment()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    t0 = time.monotonic()
    import torch
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine.llm_engine import LLMEngine

    load_general_plugins()
    import_s = time.monotonic() - t0

    from runtime.backend.vllm_loader import LOAD_FORMAT
    from runtime.instance.premap import map_entry
    from runtime.loader.cpu import tensor_views
    from tests.smollm2 import ensure_smollm2_checkpoint

    DATA.mkdir(parents=True, exist_ok=True)
    entry = dram_entry(ensure_smollm2_checkpoint(DATA / "ckpt"), DATA / "entry")
    mapped = map_entry(entry, fill=True)
    torch.set_num_threads(os.cpu_count() or 1)
    engine_args = EngineArgs(
        model=str(entry),
        tokenizer=str(entry),
        load_format=LOAD_FORMAT,
        dtype="bfloat16",
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        enable_prefix_caching=True,
        disable_log_stats=True,
    )

    def first_token(engine: Any, rid: str) -> float:
        t = time.monotonic()
        engine.add_request(rid, {"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        return time.monotonic() - t

    results: dict[str, list[float]] = {
        "build_s": [], "rebuild_s": [], "first_token_s": [], "reload_s": [],
        "first_token_after_reload_s": [],
    }  # fmt: skip
    engine: Any = None
    for i in range(args.repeats):
        engine = None
        gc.collect()
        t = time.monotonic()
        engine = LLMEngine.from_engine_args(engine_args)
        results["build_s" if i == 0 else "rebuild_s"].append(time.monotonic() - t)
        results["first_token_s"].append(first_token(engine, f"b{i}"))
    for i in range(args.repeats):
        tensors = tensor_views(mapped.index, mapped.image)
        t = time.monotonic()
        engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        engine.reset_prefix_cache()
        results["reload_s"].append(time.monotonic() - t)
        results["first_token_after_reload_s"].append(first_token(engine, f"r{i}"))
    report = {
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "model": "SmolLM2-135M-Instruct bf16 (DRAM entry)",
        "import_s": import_s,
        "runs": results,
        "median": {k: statistics.median(v) for k, v in results.items() if v},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
