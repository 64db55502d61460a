"""On CUDA, a mapped DRAM image is registered as pinned memory and copies to the device
byte for byte (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_mapped_image_is_pinned_and_copies(tmp_path: Path) -> None:
    from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
    from runtime.cache.dram import cuda_register, map_image
    from runtime.cache.synthetic import write_random_checkpoint
    from runtime.store import LocalStore
    from runtime.store.push import push_checkpoint

    write_random_checkpoint(tmp_path / "ck", (8 << 20, 1 << 20))
    store = LocalStore(tmp_path / "store")
    push_checkpoint(tmp_path / "ck", store, "ck")
    cache = TieredCache(
        store,
        SsdCache(tmp_path / "ssd", 64 << 20),
        DramCache(tmp_path / "dram", 64 << 20),
        BandwidthEstimator(),
    )
    result = cache.fetch("ck")
    mapping, image = map_image(result.directory, result.index, pin=False)
    assert cuda_register(image)
    on_device = image.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), image)
    assert mapping is not None  # the mapping must outlive every view of it
    cache.release("ck")
    cache.close()
