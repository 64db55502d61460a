"""TieredCache over a local-directory store: tiers, sharing, eviction, faults."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runtime.cache.bandwidth import DEFAULT_SEEDS
from runtime.cache.ssd import SsdWriter
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.push import push_checkpoint
from sllm.errors import CacheFull, CheckpointError, StoreError
from tests.synthetic_checkpoint import corrupt_byte

from .conftest import CHUNKS, KEY, CountingStore, MiB, TieredFactory, image_matches, leftovers


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
