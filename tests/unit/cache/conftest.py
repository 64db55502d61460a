"""The unit cache tests' checkpoint in a local-directory store and TieredCache factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
from runtime.ckpt.index import CheckpointIndex, image_layout
from runtime.store import LocalStore
from runtime.store.push import push_checkpoint
from tests.synthetic_checkpoint import write_random_checkpoint

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
