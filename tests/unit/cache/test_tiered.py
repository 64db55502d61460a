"""TieredCache over a local-directory store: tiers, sharing, eviction, faults."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.cache.bandwidth import DEFAULT_SEEDS
from runtime.cache.ssd import SsdWriter
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store import LocalStore
from runtime.store.push import push_checkpoint
from sllm.errors import CacheFull, CheckpointError, StoreError
from tests.synthetic_checkpoint import corrupt_byte, write_random_checkpoint

MiB = 1 << 20
KEY = "checkpoints/fn/0000000000000001"


class CountingStore(LocalStore):
    """A LocalStore that counts partition reads (to prove downloads are shared or absent)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, concurrency=4, part_size=MiB)
        self.range_reads = 0

    def read_range(self, key: str, offset: int, buf: memoryview) -> None:
        self.range_reads += 1
        super().read_range(key, offset, buf)


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, CheckpointIndex]:
    directory = tmp_path / "ckpt"
    return directory, write_random_checkpoint(directory, (3 * MiB + 123, MiB))


@pytest.fixture
def store(tmp_path: Path, ckpt: tuple[Path, CheckpointIndex]) -> CountingStore:
    s = CountingStore(tmp_path / "store")
    push_checkpoint(ckpt[0], s, KEY)
    return s


TieredFactory = Callable[..., TieredCache]


@pytest.fixture
def make_tiered(tmp_path: Path, store: CountingStore) -> Iterator[TieredFactory]:
    made: list[TieredCache] = []

    def make(
        ssd_capacity: int = 64 * MiB, dram_capacity: int = 64 * MiB, **kw: object
    ) -> TieredCache:
        ssd_root = kw.get("ssd_root", tmp_path / "ssd")
        dram_root = kw.get("dram_root", tmp_path / "dram")
        assert isinstance(ssd_root, Path) and isinstance(dram_root, Path)
        cache = TieredCache(
            store,
            SsdCache(ssd_root, ssd_capacity),
            DramCache(dram_root, dram_capacity),
            BandwidthEstimator(),
        )
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


# 4 MiB + 123 bytes in 1 MiB chunks: 4 chunks for partition 0, 1 for partition 1.
CHUNKS = 5


def image_matches(image: Path, src: Path, index: CheckpointIndex) -> bool:
    starts, _ = image_layout(index)
    data = image.read_bytes()
    return all(
        data[s : s + p.nbytes] == (src / p.file).read_bytes()
        for s, p in zip(starts, index.partitions, strict=True)
    )


def leftovers(root: Path) -> list[Path]:
    return list((root / "tmp").iterdir())


def test_store_then_dram_then_ssd(
    make_tiered: TieredFactory, store: CountingStore, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    cache = make_tiered()
    first = cache.fetch(KEY)
    assert first.tier == "store" and first.nbytes == ckpt[1].total_bytes
    assert [h.tier for h in first.hops] == ["store"]
    assert image_matches(first.image_path, ckpt[0], ckpt[1])
    assert (first.directory / "config.json").read_bytes() == (ckpt[0] / "config.json").read_bytes()
    assert store.range_reads == CHUNKS
    cache.flush()
    assert [(k, used) for k, _, used in cache.contents()["ssd"]] == [(KEY, False)]
    assert [(k, used) for k, _, used in cache.contents()["dram"]] == [(KEY, True)]

    hit = cache.fetch(KEY)
    assert hit.tier == "dram" and hit.hops == ()
    cache.release(KEY)
    cache.release(KEY)
    assert cache.dram.entries.remove(KEY)

    from_ssd = cache.fetch(KEY)
    assert from_ssd.tier == "ssd" and [h.tier for h in from_ssd.hops] == ["ssd"]
    assert store.range_reads == CHUNKS  # nothing downloaded again
    assert image_matches(from_ssd.image_path, ckpt[0], ckpt[1])
    # Both loads were folded into the learned bandwidths (the seeds moved).
    for tier in ("store", "ssd"):
        assert cache.bandwidths.get(tier) != DEFAULT_SEEDS[tier]


def test_dram_image_stays_pinned_until_the_ssd_copy_is_done(
    make_tiered: TieredFactory, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    cache = make_tiered()
    gate = threading.Event()
    finish = SsdWriter.finish

    def slow_finish(self: SsdWriter, index_json: bytes) -> Path:
        gate.wait(10)
        return finish(self, index_json)

    SsdWriter.finish = slow_finish  # type: ignore[method-assign]
    try:
        cache.fetch(KEY)
        cache.release(KEY)
        # The caller is done, but the SSD copy still reads the image: not evictable.
        assert cache.contents()["dram"] == [(KEY, cache.contents()["dram"][0][1], True)]
        assert not cache.dram.entries.remove(KEY)
        gate.set()
        cache.flush()
    finally:
        SsdWriter.finish = finish  # type: ignore[method-assign]
    assert cache.contents()["dram"][0][2] is False
    assert [k for k, _, _ in cache.contents()["ssd"]] == [KEY]


def test_concurrent_fetches_share_one_download(
    make_tiered: TieredFactory, store: CountingStore
) -> None:
    cache = make_tiered()
    slow_read = store.read_range

    def read_range(key: str, offset: int, buf: memoryview) -> None:
        time.sleep(0.02)  # long enough that all callers arrive while the pull runs
        slow_read(key, offset, buf)

    store.read_range = read_range  # type: ignore[method-assign]
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(KEY))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.range_reads == CHUNKS
    assert len(results) == 4 and {r.tier for r in results} == {"store"}
    assert sum(1 for r in results if r.hops) == 1
    assert cache.contents()["dram"][0][2] is True
    for _ in results:
        cache.release(KEY)
    cache.flush()  # the SSD copy pins the image until it is done
    assert cache.contents()["dram"][0][2] is False


def test_lru_eviction_keeps_in_use(
    make_tiered: TieredFactory, store: CountingStore, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    keys = [f"checkpoints/fn{i}/0000000000000001" for i in range(3)]
    for k in keys:
        push_checkpoint(ckpt[0], store, k)
    # Room for two images (each ~4.1 MiB) but not three.
    cache = make_tiered(dram_capacity=9 * MiB)
    a, b, c = keys
    cache.fetch(a)
    cache.fetch(b)
    cache.release(b)
    cache.flush()  # SSD copies done: only the callers' pins remain
    cache.fetch(c)  # a is in use: b, though newer, is the one evicted
    assert {k for k, _, _ in cache.contents()["dram"]} == {a, c}
    cache.release(c)
    cache.flush()
    cache.fetch(a)  # touch a again (still in use twice now)
    cache.release(a)
    cache.release(a)
    again = cache.fetch(b)  # both unused now: c is least recently used
    assert {k for k, _, _ in cache.contents()["dram"]} == {a, b}
    # b's image was written into c's recycled shared-memory slab: same bytes as the source.
    assert image_matches(again.image_path, ckpt[0], ckpt[1])
    assert cache.dram.entries.used_bytes() + cache.dram.pool_bytes() <= 9 * MiB


def test_preallocated_slab_is_used(
    make_tiered: TieredFactory, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    cache = make_tiered(dram_capacity=16 * MiB)
    assert cache.dram.preallocate(8 * MiB)
    assert not cache.dram.preallocate(9 * MiB)  # would not fit beside the first slab
    result = cache.fetch(KEY)
    assert cache.dram.pool_bytes() == 0  # the slab became the image (shrunk to size)
    assert result.image_path.stat().st_size == image_layout(ckpt[1])[1]
    assert image_matches(result.image_path, ckpt[0], ckpt[1])


def test_cache_too_small_fails_before_any_byte(
    make_tiered: TieredFactory, store: CountingStore, tmp_path: Path
) -> None:
    for kwargs in ({"dram_capacity": 2 * MiB}, {"ssd_capacity": 2 * MiB}):
        cache = make_tiered(**kwargs)
        with pytest.raises(CacheFull, match="capacity is 2097152"):
            cache.fetch(KEY)
        assert store.range_reads == 0
        assert cache.contents() == {"dram": [], "ssd": []}
        assert leftovers(tmp_path / "ssd") == [] and leftovers(tmp_path / "dram") == []


def test_corrupt_object_caches_nothing(
    make_tiered: TieredFactory, store: CountingStore, tmp_path: Path
) -> None:
    corrupt_byte(store.root / KEY / "data-00000.bin", at=2 * MiB + 5)
    cache = make_tiered()
    with pytest.raises(CheckpointError, match=r"data-00000\.bin: checksum .* corrupt"):
        cache.fetch(KEY)
    cache.flush()
    assert cache.contents() == {"dram": [], "ssd": []}
    assert leftovers(tmp_path / "ssd") == [] and leftovers(tmp_path / "dram") == []


def test_missing_checkpoint_is_named(make_tiered: TieredFactory, store: CountingStore) -> None:
    cache = make_tiered()
    with pytest.raises(StoreError, match=r"checkpoints/nope/index\.json not found") as err:
        cache.fetch("checkpoints/nope")
    assert err.value.code == "store_not_found"
    (store.root / KEY / "data-00001.bin").unlink()
    with pytest.raises(StoreError, match=r"data-00001\.bin not found"):
        cache.fetch(KEY)
    assert cache.contents() == {"dram": [], "ssd": []}


@pytest.fixture
def tiny_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 2 MiB tmpfs: the SSD cache believes it has 64 MiB, the disk fills mid-pull."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_pull_discards_ssd_entry(
    make_tiered: TieredFactory,
    store: CountingStore,
    tiny_disk: Path,
    ckpt: tuple[Path, CheckpointIndex],
) -> None:
    cache = make_tiered(ssd_root=tiny_disk / "ssd")
    result = cache.fetch(KEY)  # the DRAM copy is whole; the SSD copy is dropped
    cache.flush()
    assert result.tier == "store" and image_matches(result.image_path, ckpt[0], ckpt[1])
    assert cache.contents()["ssd"] == []
    assert leftovers(tiny_disk / "ssd") == []
    assert store.range_reads == CHUNKS


def test_restart_drops_partial_and_broken_entries(
    make_tiered: TieredFactory, tmp_path: Path
) -> None:
    cache = make_tiered()
    cache.fetch(KEY)
    cache.flush()
    cache.close()
    ssd = tmp_path / "ssd"
    # A crash mid-pull leaves a temp dir; a torn entry lost a partition.
    (ssd / "tmp" / "checkpoints%2Fx.1234").mkdir()
    (ssd / "tmp" / "checkpoints%2Fx.1234" / "data-00000.bin").write_bytes(b"partial")
    torn = ssd / "entries" / "checkpoints%2Ftorn"
    torn.mkdir()
    for f in (ssd / "entries").glob("checkpoints%2Ffn*/*"):
        (torn / f.name).write_bytes(f.read_bytes())
    os.truncate(torn / "data-00000.bin", 10)
    restarted = make_tiered()
    assert [k for k, _, _ in restarted.contents()["ssd"]] == [KEY]
    assert leftovers(ssd) == [] and not torn.exists()


def test_second_process_maps_dram_copy(
    make_tiered: TieredFactory, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    cache = make_tiered()
    result = cache.fetch(KEY)
    name, entry = next(iter(ckpt[1].tensors.items()))
    expected = (ckpt[0] / ckpt[1].partitions[entry.partition].file).read_bytes()[
        entry.offset : entry.offset + entry.nbytes
    ]
    code = (
        "import sys, xxhash; from pathlib import Path\n"
        "from runtime.cache.dram import map_image\n"
        "from runtime.ckpt.index import read_index, image_layout\n"
        "d = Path(sys.argv[1]); index = read_index(d); mm, t = map_image(d, index)\n"
        "e = index.tensors[sys.argv[2]]; s = image_layout(index)[0][e.partition] + e.offset\n"
        "v = t[s : s + e.nbytes].view(getattr(__import__('torch'), e.dtype))\n"
        "assert v.data_ptr() == t.data_ptr() + s  # a view of the mapping, not a copy\n"
        "print(xxhash.xxh3_64_hexdigest(v.numpy().tobytes()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(result.directory), name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import xxhash

    assert out == xxhash.xxh3_64_hexdigest(expected)


def test_lru_order_survives_a_restart(
    make_tiered: TieredFactory,
    store: CountingStore,
    ckpt: tuple[Path, CheckpointIndex],
    tmp_path: Path,
) -> None:
    a, b = "checkpoints/a/1", "checkpoints/b/1"
    for k in (a, b):
        push_checkpoint(ckpt[0], store, k)
    cache = make_tiered()
    for k in (a, b):
        cache.fetch(k)
        cache.release(k)
    cache.flush()
    assert cache.ssd.acquire(a) is not None  # a is now the most recently used
    cache.ssd.release(a)
    assert [k for k, _, _ in SsdCache(tmp_path / "ssd", 64 * MiB).contents()] == [a, b]


def test_a_restart_with_a_smaller_dram_capacity_frees_what_is_above_it(
    make_tiered: TieredFactory,
    store: CountingStore,
    ckpt: tuple[Path, CheckpointIndex],
    tmp_path: Path,
) -> None:
    # issue 14: old DRAM slabs above the configured capacity are freed at node start
    cache = make_tiered(dram_capacity=32 * MiB)
    for i in range(3):
        key = f"checkpoints/fn/{i:016d}"
        push_checkpoint(ckpt[0], store, key)
        cache.fetch(key)
        cache.release(key)
    cache.flush()
    restarted = DramCache(tmp_path / "dram", 9 * MiB)
    held = sum(f.stat().st_size for f in (tmp_path / "dram").rglob("*") if f.is_file())
    assert restarted.entries.used_bytes() + restarted.pool_bytes() <= 9 * MiB
    assert held <= 9 * MiB, f"{held} bytes of shared memory held above a 9 MiB capacity"
    assert len(restarted.contents()) == 2  # the most recently used entries that fit stay


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_loads_into_held_slabs_take_no_page_faults(
    make_tiered: TieredFactory, ckpt: tuple[Path, CheckpointIndex]
) -> None:
    """A preallocated slab is mapped and written once at start-up, and an evicted image keeps
    the node's mapping as a slab: an SSD load into either writes into populated page tables.
    (A page fault per 4 KiB halved warm loads here; a fresh slab's first touch cost 1.3-4 s
    per 2 GB.)"""
    pages = image_layout(ckpt[1])[1] // 4096
    cache = make_tiered(dram_capacity=16 * MiB)
    cache.fetch(KEY)  # store -> DRAM and SSD
    cache.release(KEY)
    cache.flush()
    assert cache.dram.entries.remove(KEY)  # the image becomes a slab, still mapped
    before = _minor_faults()
    from_slab = cache.fetch(KEY)
    recycled_faults = _minor_faults() - before
    assert from_slab.tier == "ssd"
    assert image_matches(from_slab.image_path, ckpt[0], ckpt[1])
    cache.release(KEY)

    fresh = make_tiered(dram_capacity=16 * MiB, dram_root=ckpt[0].parent / "dram2")
    assert fresh.dram.preallocate(image_layout(ckpt[1])[1])
    before = _minor_faults()
    from_new_slab = fresh.fetch(KEY)
    preallocated_faults = _minor_faults() - before
    assert from_new_slab.tier == "ssd"
    assert image_matches(from_new_slab.image_path, ckpt[0], ckpt[1])
    fresh.release(KEY)
    # Faulting the image in would be one per page (~1000); what remains is the interpreter's.
    assert recycled_faults < pages // 4, (recycled_faults, pages)
    assert preallocated_faults < pages // 4, (preallocated_faults, pages)
