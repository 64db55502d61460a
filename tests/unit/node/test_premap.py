"""Idle instance processes keep DRAM images mapped: map, populate, hand over, unmap."""

from __future__ import annotations

from pathlib import Path

from runtime.cache.synthetic import write_random_checkpoint
from runtime.ckpt.index import image_layout
from runtime.instance.premap import Premapper


def dram_entry(root: Path, name: str) -> Path:
    """A DRAM-tier entry directory: index.json + image.bin (partitions at image offsets)."""
    entry = root / name
    index = write_random_checkpoint(entry, partition_bytes=(8192, 4096), seed=len(name))
    starts, size = image_layout(index)
    image = bytearray(size)
    for start, part in zip(starts, index.partitions, strict=True):
        data = (entry / part.file).read_bytes()
        image[start : start + len(data)] = data
    (entry / "image.bin").write_bytes(bytes(image))
    return entry


def test_premapper_maps_hands_over_and_unmaps(tmp_path: Path) -> None:
    a, b = str(dram_entry(tmp_path, "a")), str(dram_entry(tmp_path, "bb"))
    premapper = Premapper()
    premapper.update([a, b, str(tmp_path / "evicted-meanwhile")])
    assert set(premapper.images) == {a, b}
    mapped_a = premapper.images[a]
    assert mapped_a.image.numel() == (Path(a) / "image.bin").stat().st_size
    first = bytes(mapped_a.image[:16].tolist())
    assert first == (Path(a) / "image.bin").read_bytes()[:16]
    premapper.update([b])  # a left the DRAM tier
    assert set(premapper.images) == {b} and mapped_a.mapping.closed
    taken = premapper.take(b)
    assert taken is not None and taken.populated and not premapper.images
    assert premapper.take(a) is None
