"""Tiered cache benchmark (issues 3 and 15): time-to-DRAM-ready from the store and from SSD
against limits measured by independent tools in the same run, and a model ready from DRAM
against a model ready from SSD.

    .venv/bin/python bench/tiers.py --size-gb 1 --json bench/.data/tiers.json

Starts a real SeaweedFS S3 server on loopback (sllm_cli.servers.start_seaweedfs), writes a random
Llama-shaped model of about N GB, converts it (partitions of --partition-mb), pushes it, then
per repetition runs three pairs, each pair in ABBA order over the repetitions (A B, B A, B A,
A B, ...) so each contender follows the other equally often:

- ``store_raw`` / ``store``: curl (another client: its own processes, SigV4 signing, ranged
  GETs of the same chunks, ``--concurrency`` processes at once, bodies to /dev/null) against
  ``TieredCache.fetch`` with empty tiers (the pull into DRAM; the SSD copy after it is
  awaited, untimed), each repetition's pair after an untimed curl pass that brings the
  server's objects back into its page cache (the SSD pairs drop every cache as root);
- ``ssd_raw`` / ``ssd``: fio (O_DIRECT, libaio, bench/_load_data.py's job shapes, the faster)
  over the SSD entry's partitions against ``fetch`` from SSD (DRAM entry removed), page cache
  dropped before each;
- ``model_ssd`` / ``model_dram``: a model ready, as an instance makes it (``map_entry`` with the
  pages populated, tensor views, ``build_model``), after a ``fetch`` from SSD (page cache
  dropped) against after a ``fetch`` that hits DRAM. The model class is built once before.

``--dram-dir`` puts the DRAM tier in another tmpfs, as a node's SLLM_DRAM_DIR does (the JSON
says which, and its huge-page mode). Reports medians over --repeat runs, ratios of the medians and medians of the per-repetition
ratios (``*_paired``). Needs root for ``/proc/sys/vm/drop_caches`` (else posix_fadvise
DONTNEED on the files it reads) and for installing fio when it is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from _load_data import drop_caches, ensure_fio, fio_read

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.cache.hugepages import dram_pages
from runtime.cache.pull import plan_chunks
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.base import join_key
from runtime.store.push import push_checkpoint
from runtime.store.s3 import S3Store, make_client
from sllm_cli.servers import start_seaweedfs

MiB = 1 << 20
KEY = "checkpoints/bench/0000000000000001"
DATA = Path(__file__).resolve().parent / ".data"


def build_checkpoint(directory: Path, size_gb: float, partition_bytes: int) -> CheckpointIndex:
    """A random Llama (hidden 2048, float32: ~180 MB a layer, ~524 MB of embeddings) of about
    ``size_gb`` GB, converted to the sllm format."""
    from runtime.ckpt.convert import convert_checkpoint
    from tests.tiny_model import TinyConfig, build_tiny_llama

    layers = max(1, round((size_gb * 1e9 - 524e6) / 180e6))
    config = TinyConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    hf = build_tiny_llama(directory / "hf", seed=0, config=config)
    index = convert_checkpoint(hf, directory / "ckpt", partition_bytes=partition_bytes)
    shutil.rmtree(hf)
    return index


def curl_get(
    endpoint: str, bucket: str, index: CheckpointIndex, part_size: int, processes: int
) -> float:
    """Seconds for ``processes`` curl processes to GET every chunk of the checkpoint (ranged
    GETs of ``part_size``, keep-alive within a process, bodies discarded): the store's limit
    seen by a client that shares no code with sllm."""
    chunks = plan_chunks(index, part_size)
    key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    with tempfile.TemporaryDirectory(prefix="sllm-curl-") as tmp:
        configs = []
        for p in range(processes):
            blocks = []
            for c in chunks[p::processes]:
                url = f"{endpoint}/{bucket}/{join_key(KEY, index.partitions[c.partition].file)}"
                blocks.append(
                    f'url = "{url}"\nrange = "{c.offset}-{c.offset + c.nbytes - 1}"\n'
                    f'output = "/dev/null"\naws-sigv4 = "aws:amz:us-east-1:s3"\n'
                    f'user = "{key_id}:{secret}"\nfail\nsilent\nshow-error\n'
                )
            path = Path(tmp) / f"{p}.cfg"
            path.write_text("next\n".join(blocks))
            configs.append(path)
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["curl", "-K", str(c)]) for c in configs]
        codes = [proc.wait() for proc in procs]
        elapsed = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"curl failed: exit codes {codes}")
    return elapsed


def model_ready(cache: TieredCache) -> tuple[float, str]:
    """fetch, then what an instance does on CPU: map (populated), views, model build."""
    from runtime.instance.premap import map_entry
    from runtime.loader.cpu import tensor_views
    from runtime.loader.model import build_model

    t0 = time.perf_counter()
    result = cache.fetch(KEY)
    mapped = map_entry(result.directory, fill=True)
    model = build_model(result.directory, tensor_views(mapped.index, mapped.image))
    elapsed = time.perf_counter() - t0
    del model
    mapped.close()
    cache.release(KEY)
    return elapsed, result.tier


def pair(rep: int, a: Callable[[], None], b: Callable[[], None]) -> None:
    """A then B, or B then A: ABBA over the repetitions."""
    for step in (b, a) if rep % 4 in (1, 2) else (a, b):
        step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--partition-mb", type=int, default=256, help="partition file size in MiB")
    ap.add_argument("--repeat", type=int, default=4, help="repetitions (medians are reported)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel ranged GETs")
    ap.add_argument("--part-mb", type=int, default=16, help="bytes per ranged GET, MiB")
    ap.add_argument(
        "--dram-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="tmpfs of the DRAM tier, as a node's SLLM_DRAM_DIR (default /dev/shm); e.g. one "
        "mounted with huge=within_size for 2 MiB pages",
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.dram_pages = dram_pages(args.dram_dir)  # ValidationFailed: not a tmpfs directory
    print(f"DRAM tier in {args.dram_pages.describe()}", file=sys.stderr)

    fio = ensure_fio()
    work = DATA / "tiers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    index = build_checkpoint(work, args.size_gb, args.partition_mb * MiB)
    print(f"checkpoint: {index.total_bytes / 1e9:.2f} GB in {len(index.partitions)} partitions "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)  # fmt: skip

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "sllm-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "sllm-bench-secret")
    server = start_seaweedfs(work / "seaweedfs")
    cache: TieredCache | None = None
    runs: dict[str, list[float]] = {
        k: [] for k in ("store_raw", "store", "ssd_raw", "ssd", "model_ssd", "model_dram")
    }
    loads: list[float] = []
    try:
        endpoint = f"http://127.0.0.1:{server.ports['s3']}"
        client = make_client(endpoint, "us-east-1", True, args.concurrency)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        store = S3Store(
            client, "bench", "", concurrency=args.concurrency, part_size=args.part_mb * MiB
        )
        push_checkpoint(work / "ckpt", store, KEY)
        shutil.rmtree(work / "ckpt")  # only the store's copy remains
        image = image_layout(index)[1]
        cache = TieredCache(
            store,
            SsdCache(work / "ssd", 2 * image + 64 * MiB),
            DramCache(args.dram_dir / f"sllm-bench-{os.getpid()}", 2 * image + 64 * MiB),
            BandwidthEstimator(),
        )
        cache.dram.preallocate(image)  # as a node does at start-up
        tc = cache

        def store_raw() -> None:
            runs["store_raw"].append(
                curl_get(endpoint, "bench", index, args.part_mb * MiB, args.concurrency)
            )

        def store_fetch() -> None:
            tc.dram.entries.remove(KEY)
            tc.ssd.entries.remove(KEY)
            r = tc.fetch(KEY)
            assert r.tier == "store"
            runs["store"].append(r.seconds)
            tc.release(KEY)
            tc.flush()

        def ssd_raw() -> None:
            parts = [tc.ssd.entries.path(KEY) / p.file for p in index.partitions]
            drop_caches(parts)
            runs["ssd_raw"].append(min(fio_read(fio, parts).values()))

        def ssd_fetch() -> None:
            tc.dram.entries.remove(KEY)
            drop_caches([tc.ssd.entries.path(KEY)])
            r = tc.fetch(KEY)
            assert r.tier == "ssd"
            runs["ssd"].append(r.seconds)
            tc.release(KEY)

        def ready_ssd() -> None:
            tc.dram.entries.remove(KEY)
            drop_caches([tc.ssd.entries.path(KEY)])
            seconds, tier = model_ready(tc)
            assert tier == "ssd"
            runs["model_ssd"].append(seconds)

        def ready_dram() -> None:
            if tc.dram.acquire(KEY) is None:
                tc.fetch(KEY)  # bring it to DRAM first (not timed)
            tc.release(KEY)
            seconds, tier = model_ready(tc)
            assert tier == "dram"
            runs["model_dram"].append(seconds)

        # warm-up, not timed: the server's page cache for the objects, the model class
        curl_get(endpoint, "bench", index, args.part_mb * MiB, args.concurrency)
        store_fetch()
        model_ready(cache)
        for name in runs:
            runs[name].clear()
        for rep in range(args.repeat):
            loads.append(os.getloadavg()[0])
            # The previous repetition's SSD pairs dropped every page cache as root, the S3
            # server's objects too: warm them again (not timed), or whichever contender ran
            # first read from the server's disk (the first of each pair was 0.2-0.3 s slower).
            curl_get(endpoint, "bench", index, args.part_mb * MiB, args.concurrency)
            pair(rep, store_raw, store_fetch)
            pair(rep, ssd_raw, ssd_fetch)
            pair(rep, ready_ssd, ready_dram)
            print(f"rep {rep}: " + " ".join(f"{k}={v[-1]:.3f}s" for k, v in runs.items()),
                  file=sys.stderr)  # fmt: skip
    finally:
        if cache is not None:
            cache.close()
            shutil.rmtree(cache.dram.root, ignore_errors=True)
        server.stop()
    print(json.dumps(summarize(index, args, runs, loads), indent=1))
    return 0


def summarize(
    index: CheckpointIndex,
    args: argparse.Namespace,
    runs: dict[str, list[float]],
    loads: list[float],
) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in runs.items()}
    nbytes = index.total_bytes

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))

    result: dict[str, Any] = {
        "size_bytes": nbytes,
        "partitions": len(index.partitions),
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "part_bytes": args.part_mb * MiB,
        "limit_tools": {"store": "curl", "ssd": "fio"},
        "dram_dir": str(args.dram_dir),
        "dram_huge_pages": args.dram_pages.huge,
        "store_raw_gbps": nbytes / med["store_raw"] / 1e9,
        "store_to_dram_gbps": nbytes / med["store"] / 1e9,
        "ssd_raw_gbps": nbytes / med["ssd_raw"] / 1e9,
        "ssd_to_dram_gbps": nbytes / med["ssd"] / 1e9,
        "store_ready_s": med["store"],
        "ssd_ready_s": med["ssd"],
        "model_ready_ssd_s": med["model_ssd"],
        "model_ready_dram_s": med["model_dram"],
        # a model ready from DRAM against one ready from SSD (like with like)
        "dram_hit_ready_s": med["model_dram"],
        "dram_hit_vs_ssd": med["model_dram"] / med["model_ssd"],
        "dram_hit_vs_ssd_paired": paired("model_dram", "model_ssd"),
        "store_vs_raw": med["store_raw"] / med["store"],
        "ssd_vs_raw": med["ssd_raw"] / med["ssd"],
        "store_vs_raw_paired": paired("store_raw", "store"),
        "ssd_vs_raw_paired": paired("ssd_raw", "ssd"),
        "load_average": loads,
        "runs_s": runs,
    }
    targets = {"store_vs_raw_paired": 0.85, "ssd_vs_raw_paired": 0.9}
    result["targets"] = {
        k: {"target": t, "value": round(result[k], 3), "met": result[k] >= t}
        for k, t in targets.items()
    }
    result["targets"]["dram_hit_vs_ssd_paired_max"] = {
        "target": 0.05,
        "value": round(result["dram_hit_vs_ssd_paired"], 4),
        "met": result["dram_hit_vs_ssd_paired"] < 0.05,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
