"""Tiered cache benchmark (issue 3): time-to-DRAM-ready from the store, from SSD (cold) and
from DRAM, against the raw limits measured in the same run.

    .venv/bin/python bench/tiers.py --size-gb 1 --json bench/.data/tiers.json

Starts a real SeaweedFS S3 server on loopback (sllm.servers.start_seaweedfs), writes a random
checkpoint of N GB (partitions of --partition-mb), pushes it, then per repetition:

- ``store_raw``: parallel ranged GETs of the same objects, same concurrency and part size as
  the cache, into a buffer allocated and touched once beforehand (the store's limit);
- ``store``: ``TieredCache.fetch`` with empty tiers: pipelined pull into DRAM + SSD;
- ``ssd_raw``: O_DIRECT reads of the SSD entry's partitions (16 MiB, 4 in flight on started
  threads, a plain loop of its own) into a pre-touched buffer after dropping the page cache (the disk's limit);
- ``ssd``: DRAM entry removed, page cache dropped, ``fetch`` (SSD -> DRAM);
- ``dram_hit``: ``fetch`` again (already in DRAM).

Reports medians over --repeat runs (ratios of the medians, and medians of the per-repetition
ratios as ``*_paired``: each against the raw limit measured just before it). Needs root for ``/proc/sys/vm/drop_caches`` (otherwise
falls back to posix_fadvise(DONTNEED) on the files it reads).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.cache.pull import plan_chunks
from runtime.cache.synthetic import write_random_checkpoint
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.base import join_key
from runtime.store.push import push_checkpoint
from runtime.store.s3 import S3Store, make_client
from sllm.servers import start_seaweedfs

MiB = 1 << 20
KEY = "checkpoints/bench/0000000000000001"
DATA = Path(__file__).resolve().parent / ".data"


def drop_caches(paths: list[Path]) -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    except OSError:
        pass
    for path in paths:
        for f in [path] if path.is_file() else path.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def touched(nbytes: int) -> memoryview:
    """A buffer whose pages are faulted in already (DESIGN.md: first touch costs 0.5-3.5 GB/s
    on this VM, which is not what a raw limit should measure)."""
    import mmap

    buf = mmap.mmap(-1, nbytes)
    view = memoryview(buf)
    zeros = bytes(16 * MiB)
    for off in range(0, nbytes, len(zeros)):
        n = min(len(zeros), nbytes - off)
        view[off : off + n] = zeros[:n]
    return view


def raw_disk(
    directory: Path, index: CheckpointIndex, buf: memoryview, pool: ThreadPoolExecutor
) -> float:
    """O_DIRECT reads of every partition, 16 MiB requests, 4 in flight, into ``buf``: the
    disk's limit (independent of runtime.cache.disk_read, which the tier uses)."""
    starts, _ = image_layout(index)
    step = 16 * MiB
    jobs = [(i, off) for i, p in enumerate(index.partitions) for off in range(0, p.nbytes, step)]
    fds = [os.open(directory / p.file, os.O_RDONLY | os.O_DIRECT) for p in index.partitions]

    def read(job: tuple[int, int]) -> None:
        i, off = job
        want = min(step, index.partitions[i].nbytes - off)
        length = (want + 4095) // 4096 * 4096
        os.preadv(fds[i], [buf[starts[i] + off : starts[i] + off + length]], off)

    t0 = time.perf_counter()
    list(pool.map(read, jobs))
    elapsed = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    return elapsed


def raw_get(
    store: S3Store, index: CheckpointIndex, buf: memoryview, pool: ThreadPoolExecutor
) -> float:
    """Ranged GETs of every chunk, ``store.concurrency`` at once (threads already started,
    as the cache's are), into ``buf``: the store's limit."""
    starts, _ = image_layout(index)
    chunks = plan_chunks(index, store.part_size)

    def get(c: object) -> None:
        from runtime.cache.pull import Chunk

        assert isinstance(c, Chunk)
        part = index.partitions[c.partition]
        start = starts[c.partition] + c.offset
        store.read_range(join_key(KEY, part.file), c.offset, buf[start : start + c.nbytes])

    t0 = time.perf_counter()
    list(pool.map(get, chunks))
    return time.perf_counter() - t0


def make_cache(store: S3Store, work: Path, size: int) -> TieredCache:
    for d in ("ssd", "dram"):
        shutil.rmtree(work / d, ignore_errors=True)
    return TieredCache(
        store,
        SsdCache(work / "ssd", 2 * size + 64 * MiB),
        DramCache(Path("/dev/shm") / f"sllm-bench-{os.getpid()}", 2 * size + 64 * MiB),
        BandwidthEstimator(),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--partition-mb", type=int, default=256, help="partition file size in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel ranged GETs")
    ap.add_argument("--part-mb", type=int, default=16, help="bytes per ranged GET, MiB")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    total = int(args.size_gb * 1e9)
    part = args.partition_mb * MiB
    sizes = tuple([part] * (total // part) + ([total % part] if total % part else []))
    work = DATA / "tiers"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    index = write_random_checkpoint(work / "ckpt", sizes, tensor_bytes=64 * MiB)
    print(f"checkpoint: {index.total_bytes / 1e9:.2f} GB in {len(sizes)} partitions "
          f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)  # fmt: skip

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "sllm-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "sllm-bench-secret")
    server = start_seaweedfs(work / "seaweedfs")
    cache: TieredCache | None = None
    get_pool: ThreadPoolExecutor | None = None
    disk_pool: ThreadPoolExecutor | None = None
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
        t0 = time.perf_counter()
        push_checkpoint(work / "ckpt", store, KEY)
        print(f"pushed in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        shutil.rmtree(work / "ckpt")  # only the store's copy remains

        image = image_layout(index)[1]
        raw_buf = touched(image)
        cache = make_cache(store, work, image)
        get_pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="raw-get")
        disk_pool = ThreadPoolExecutor(4, thread_name_prefix="raw-disk")
        # As a node does at start-up: one DRAM slab allocated before any load.
        cache.dram.preallocate(image)
        runs: dict[str, list[float]] = {
            k: [] for k in ("store_raw", "store", "ssd_raw", "ssd", "dram")
        }
        for rep in range(args.repeat):
            cache.dram.entries.remove(KEY)
            cache.ssd.entries.remove(KEY)
            raw_get(store, index, raw_buf, get_pool)  # warm the server's page cache for both
            runs["store_raw"].append(raw_get(store, index, raw_buf, get_pool))
            r = cache.fetch(KEY)
            assert r.tier == "store"
            runs["store"].append(r.seconds)
            cache.release(KEY)
            cache.flush()
            entry = cache.ssd.entries.path(KEY)

            drop_caches([entry])
            runs["ssd_raw"].append(raw_disk(entry, index, raw_buf, disk_pool))

            assert cache.dram.entries.remove(KEY)
            drop_caches([entry])
            r = cache.fetch(KEY)
            assert r.tier == "ssd"
            runs["ssd"].append(r.seconds)

            r2 = cache.fetch(KEY)
            assert r2.tier == "dram"
            runs["dram"].append(r2.seconds)
            cache.release(KEY)
            cache.release(KEY)
            print(f"rep {rep}: " + " ".join(f"{k}={v[-1]:.3f}s" for k, v in runs.items()),
                  file=sys.stderr)  # fmt: skip
    finally:
        for pool in (get_pool, disk_pool):
            if pool is not None:
                pool.shutdown()
        if cache is not None:
            cache.close()
            shutil.rmtree(cache.dram.root, ignore_errors=True)
        server.stop()

    med = {k: statistics.median(v) for k, v in runs.items()}
    nbytes = index.total_bytes
    result = {
        "size_bytes": nbytes,
        "partitions": len(sizes),
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "part_bytes": args.part_mb * MiB,
        "store_raw_gbps": nbytes / med["store_raw"] / 1e9,
        "store_to_dram_gbps": nbytes / med["store"] / 1e9,
        "ssd_raw_gbps": nbytes / med["ssd_raw"] / 1e9,
        "ssd_to_dram_gbps": nbytes / med["ssd"] / 1e9,
        "store_ready_s": med["store"],
        "ssd_ready_s": med["ssd"],
        "dram_hit_ready_s": med["dram"],
        "runs_s": runs,
    }
    # Paired: each repetition's tier time against the raw limit measured just before it.
    result["store_vs_raw_paired"] = statistics.median(
        r / t for r, t in zip(runs["store_raw"], runs["store"], strict=True)
    )
    result["ssd_vs_raw_paired"] = statistics.median(
        r / t for r, t in zip(runs["ssd_raw"], runs["ssd"], strict=True)
    )
    result["store_vs_raw"] = result["store_to_dram_gbps"] / result["store_raw_gbps"]
    result["ssd_vs_raw"] = result["ssd_to_dram_gbps"] / result["ssd_raw_gbps"]
    result["dram_hit_vs_ssd"] = med["dram"] / med["ssd"]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
