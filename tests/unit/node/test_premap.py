"""Idle instance processes keep DRAM images mapped: map, populate, hand over, unmap."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.ckpt.index import image_layout
from runtime.instance.premap import Premapper
from tests.synthetic_checkpoint import write_random_checkpoint


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


def test_a_recycled_image_is_never_handed_over_as_another_entrys(tmp_path: Path) -> None:
    """Issue 14, bug 3: an idle process maps entry A; A is evicted, its image file (the same
    inode) becomes a free slab and the next entry B is written into it; A is fetched again
    into a new file at the same path. The old mapping now holds B's bytes: it must not be
    handed over (nor kept by ``update``) as A's."""
    from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
    from runtime.store import LocalStore
    from runtime.store.push import push_checkpoint

    store = LocalStore(tmp_path / "store")
    for key, seed in (("a", 1), ("b", 2)):
        write_random_checkpoint(tmp_path / key, (8192, 4096), seed=seed)
        push_checkpoint(tmp_path / key, store, key)
    dram = DramCache(tmp_path / "dram", 1 << 20)
    cache = TieredCache(store, SsdCache(tmp_path / "ssd", 1 << 20), dram, BandwidthEstimator())
    try:
        a = cache.fetch("a")
        cache.release("a")
        cache.flush()  # the SSD write-behind holds the DRAM image until it is done
        a_bytes = (a.directory / "image.bin").read_bytes()
        untold, told = Premapper(), Premapper()
        untold.update([str(a.directory)])
        told.update([str(a.directory)])
        assert dram.entries.remove("a")  # evicted: its image becomes a free slab
        cache.fetch("b")  # ... which b is written into
        cache.release("b")
        cache.flush()
        again = cache.fetch("a")  # a again, at the same path, in a new file
        assert again.directory == a.directory
        assert (again.directory / "image.bin").read_bytes() == a_bytes
        # a load with no premap update since (the node sends none while a load runs)
        taken = untold.take(str(a.directory))
        assert taken is None or bytes(taken.image.tolist()) == a_bytes
        told.update([str(a.directory)])  # the node's next premap: a is listed again
        taken = told.take(str(a.directory))
        assert taken is not None and bytes(taken.image.tolist()) == a_bytes
        cache.release("a")
    finally:
        cache.close()


def test_a_vllm_premapper_keeps_vllms_tokenizer_of_each_current_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vLLM process loads vLLM's tokenizer of each premapped entry into vLLM's cache (the
    real cache and its key are pinned in tests/integration/vllm/test_loader_plugin.py). The
    cache cannot drop one entry: when one leaves, it is emptied and the others' loaded again."""
    from runtime.backend import vllm_build

    cache: dict[str, str] = {}
    loads: list[str] = []

    def preload(entry: Path, task: str = "generate") -> str:
        loads.append(entry.name)
        cache[str(entry)] = f"tokenizer of {entry.name}"
        return cache[str(entry)]

    monkeypatch.setattr(vllm_build, "preload_engine_tokenizer", preload)
    monkeypatch.setattr(vllm_build, "forget_engine_tokenizers", cache.clear)
    a, b, c = (dram_entry(tmp_path, n) for n in ("a", "bb", "ccc"))
    (c / "config.json").unlink(missing_ok=True)  # c has no model config: nothing to load
    premapper = Premapper(engine_tokenizers=True)
    premapper.update([str(a), str(b), str(c)])
    assert loads == ["a", "bb"]
    assert premapper.images[str(a)].engine_tokenizer == "tokenizer of a"
    assert premapper.images[str(c)].engine_tokenizer is None
    premapper.update([str(a), str(b), str(c)])  # nothing changed: nothing loaded again
    assert loads == ["a", "bb"]
    premapper.update([str(b), str(c)])  # a left the DRAM tier
    assert loads == ["a", "bb", "bb"] and set(cache) == {str(b)}
    assert premapper.images[str(b)].engine_tokenizer == "tokenizer of bb"
    assert not Premapper().engine_tokenizers  # off by default
