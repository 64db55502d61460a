"""The node's tiers as ``sllm node start`` builds them (``runtime.node.main.build_cache``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.node.main import build_cache, dram_root
from sllm.settings import NodeSettings

MiB = 1 << 20


def test_dram_preallocate_makes_a_slab_at_start(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    settings = NodeSettings.from_env(
        {
            "SLLM_NODE_ID": "prealloc",
            "SLLM_STORE_URL": str(tmp_path / "store"),
            "SLLM_CACHE_DIR": str(tmp_path / "cache"),
            "SLLM_DRAM_CAPACITY": "16Mi",
            "SLLM_DRAM_PREALLOCATE": "4Mi",
        }
    )
    cache, _ = build_cache(settings)
    try:
        assert cache.dram.pool_bytes() == 4 * MiB
        assert [p.stat().st_size for p in (cache.dram.root / "free").iterdir()] == [4 * MiB]
    finally:
        cache.close()
        shutil.rmtree(dram_root(settings), ignore_errors=True)
