"""TieredCache across restarts and processes: a full disk mid-pull, partial and broken entries
after a restart, a second process mapping the DRAM copy, LRU order and capacity kept, held
slabs loaded without page faults."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cache import DramCache, SsdCache
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store.push import push_checkpoint

from .conftest import CHUNKS, KEY, CountingStore, MiB, TieredFactory, image_matches, leftovers


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
