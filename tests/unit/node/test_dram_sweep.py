"""Node start removes DRAM tiers (shared memory) left by nodes whose cache directory is gone,
and only those: this user's, with an owner file naming a missing directory."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.node.main import OWNER_FILE, sweep_orphan_dram


def tier(shm: Path, name: str, owner: Path | None) -> Path:
    root = shm / name
    (root / "entries" / "ck").mkdir(parents=True)
    (root / "entries" / "ck" / "image.bin").write_bytes(b"x" * 4096)
    if owner is not None:
        (root / OWNER_FILE).write_text(str(owner), encoding="utf-8")
    return root


def test_only_orphans_of_this_user_are_removed(tmp_path: Path) -> None:
    shm, live = tmp_path / "shm", tmp_path / "live-cache"
    live.mkdir()
    uid = os.getuid()
    kept = tier(shm, f"sllm-{uid}-n1-aaaa", live)
    orphan = tier(shm, f"sllm-{uid}-n2-bbbb", tmp_path / "deleted-cache")
    unknown = tier(shm, f"sllm-{uid}-n3-cccc", None)  # no owner file: not ours to judge
    other = tier(shm, f"sllm-{uid + 1}-n4-dddd", tmp_path / "deleted-cache")
    bench = tier(shm, "sllm-bench-123", tmp_path / "deleted-cache")
    assert sweep_orphan_dram(shm) == [orphan]
    assert not orphan.exists()
    assert all(p.exists() for p in (kept, unknown, other, bench))
    assert sweep_orphan_dram(shm) == []
