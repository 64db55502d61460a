"""The DRAM tier on a tmpfs mounted ``huge=within_size`` (SLLM_DRAM_DIR, docs/tiers.md): a
pulled image and one read from SSD sit in 2 MiB pages, an instance's read-only mapping of it
maps them whole (one page-table entry per 2 MiB), and the bytes are the checkpoint's.

Mounting needs root (CAP_SYS_ADMIN): skipped without it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.cache.dram import map_image
from runtime.cache.hugepages import dram_pages
from runtime.ckpt.index import image_layout
from runtime.store import LocalStore
from runtime.store.push import push_checkpoint
from tests.synthetic_checkpoint import write_random_checkpoint

MiB = 1 << 20
KEY = "checkpoints/fn/0000000000000001"


@pytest.fixture
def huge_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "huge"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "huge=within_size,size=64m", "tmpfs", str(point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def pmd_mapped_kib(image: Path) -> int:
    """ShmemPmdMapped of this process's read-only mapping of ``image`` (/proc/self/smaps)."""
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = fields[1].startswith("r--s") and line.endswith(str(image))
        elif current and fields[0] == "ShmemPmdMapped:":
            return int(fields[1])
    raise AssertionError(f"no read-only mapping of {image} in /proc/self/smaps")


def test_images_on_a_huge_tmpfs_are_mapped_in_2mib_pages(tmp_path: Path, huge_tmpfs: Path) -> None:
    assert dram_pages(huge_tmpfs).huge_pages
    src = tmp_path / "ckpt"
    index = write_random_checkpoint(src, (6 * MiB + 123, 3 * MiB))
    store = LocalStore(tmp_path / "store", concurrency=4, part_size=MiB)
    push_checkpoint(src, store, KEY)
    cache = TieredCache(
        store,
        SsdCache(tmp_path / "ssd", 64 * MiB),
        DramCache(huge_tmpfs / "tier", 48 * MiB),
        BandwidthEstimator(),
    )
    try:
        for tier in ("store", "ssd"):
            result = cache.fetch(KEY)
            assert result.tier == tier
            image = result.directory / "image.bin"
            mapping, tensor = map_image(image, result.index)
            try:
                tensor.sum()  # touch every page, as an instance's first pass does
                assert pmd_mapped_kib(image) >= 4096, tier  # the whole 2 MiB pages inside 9 MiB
                data = memoryview(mapping)
                starts, _ = image_layout(index)
                for start, part in zip(starts, index.partitions, strict=True):
                    assert data[start : start + part.nbytes] == (src / part.file).read_bytes()
                data.release()
            finally:
                del tensor
                mapping.close()
            cache.release(KEY)
            cache.flush()  # the SSD write-behind holds the DRAM image until it is done
            assert cache.dram.entries.remove(KEY)  # the next fetch reads the SSD copy
    finally:
        cache.close()
