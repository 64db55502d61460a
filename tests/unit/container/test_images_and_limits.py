"""Pure parts of the container backend: requirement lines, input digests, cgroup limit files
(on a directory laid out like /sys/fs/cgroup)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.container import cgroups
from runtime.container.images import digest_files, requirement_lines


def test_requirement_lines_drop_comments_and_blanks() -> None:
    text = "# packages\n\nhumanize==4.12.3  # formatting\n  numpy\n"
    assert requirement_lines(text) == ["humanize==4.12.3", "numpy"]
    assert requirement_lines("# none\n\n") == []


def test_digest_follows_content_not_bytecode(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = digest_files(tmp_path, ["pkg"])
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert digest_files(tmp_path, ["pkg"]) == first
    assert digest_files(tmp_path, ["pkg"], extra="other base") != first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert digest_files(tmp_path, ["pkg"]) != first


def fake_hierarchy(root: Path, v2: bool) -> dict[str, Path]:
    """Directories for this process's cgroups under ``root``, as /proc/self/cgroup names."""
    dirs = {}
    if v2:
        (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
        (root / "cgroup.controllers").write_text("memory cpu\n")
    for line in Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        key = controllers or ""
        if v2 != (key == ""):
            continue
        where = root / controllers / path.lstrip("/") if controllers else root / path.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        dirs[key] = where
    return dirs


def test_v1_limits_memory_without_swap_and_cpu_quota(tmp_path: Path) -> None:
    dirs = fake_hierarchy(tmp_path, v2=False)
    if "memory" not in {c for key in dirs for c in key.split(",")}:
        pytest.skip("this process's cgroups have no v1 memory controller to mirror")
    memory = next(d for key, d in dirs.items() if "memory" in key.split(","))
    (memory / "memory.memsw.limit_in_bytes").write_text("-1")
    cgroups.set_limits(os.getpid(), 1 << 30, 2, root=tmp_path)
    assert (memory / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(1 << 30)
    cpu = next((d for key, d in dirs.items() if "cpu" in key.split(",")), None)
    if cpu is not None:
        assert (cpu / "cpu.cfs_quota_us").read_text() == str(2 * cgroups.CFS_PERIOD_US)


def test_v2_limits(tmp_path: Path) -> None:
    dirs = fake_hierarchy(tmp_path, v2=True)
    if "" not in dirs:
        pytest.skip("no unified hierarchy line for this process")
    unified = dirs[""]
    (unified / "memory.swap.max").write_text("max")
    cgroups.set_limits(os.getpid(), 512 << 20, 1, root=tmp_path)
    assert (unified / "memory.max").read_text() == str(512 << 20)
    assert (unified / "memory.swap.max").read_text() == "0"
    assert (unified / "cpu.max").read_text() == f"{cgroups.CFS_PERIOD_US} {cgroups.CFS_PERIOD_US}"
