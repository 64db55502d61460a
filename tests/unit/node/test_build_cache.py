"""The node's tiers as ``sllm node start`` builds them (``runtime.node.main.build_cache``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from runtime.cache.hugepages import MEMORY_FS, mount_of
from runtime.node.main import OWNER_FILE, build_cache, dram_root
from sllm.errors import ValidationFailed
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


def _settings(tmp_path: Path, **env: str) -> NodeSettings:
    (tmp_path / "store").mkdir(exist_ok=True)
    return NodeSettings.from_env(
        {
            "SLLM_NODE_ID": "dramdir",
            "SLLM_STORE_URL": str(tmp_path / "store"),
            "SLLM_CACHE_DIR": str(tmp_path / "cache"),
            "SLLM_DRAM_CAPACITY": "16Mi",
            **env,
        }
    )


def test_dram_dir_holds_the_tier_and_its_orphans_are_swept_there(tmp_path: Path) -> None:
    # a tmpfs directory other than /dev/shm's top (where the session leak check looks)
    shm = Path(tempfile.mkdtemp(prefix=f"sllm-{os.getuid()}-dramdir-", dir="/dev/shm"))
    try:
        orphan = shm / f"sllm-{os.getuid()}-gone-0123456789"
        orphan.mkdir()
        (orphan / OWNER_FILE).write_text(str(tmp_path / "deleted"))
        settings = _settings(tmp_path, SLLM_DRAM_DIR=str(shm))
        assert dram_root(settings).parent == shm
        cache, _ = build_cache(settings)
        try:
            assert cache.dram.root == dram_root(settings) and cache.dram.root.is_dir()
            assert not orphan.exists()
        finally:
            cache.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_dram_dir_that_cannot_hold_the_tier_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="SLLM_DRAM_DIR='shm': must be an absolute path"):
        _settings(tmp_path, SLLM_DRAM_DIR="shm")
    with pytest.raises(ValidationFailed, match=r"SLLM_DRAM_DIR=.*missing.*not a directory"):
        build_cache(_settings(tmp_path, SLLM_DRAM_DIR=str(tmp_path / "missing")))
    disk = Path(__file__).resolve().parent  # the checkout, on a disk's file system
    mount = mount_of(str(disk), Path("/proc/self/mountinfo").read_text())
    if mount is None or mount.fstype in MEMORY_FS:
        return  # a checkout in memory: nothing on disk to refuse here
    with pytest.raises(ValidationFailed, match="not in memory; the DRAM tier needs a tmpfs"):
        build_cache(_settings(tmp_path, SLLM_DRAM_DIR=str(disk)))
