"""What page size the DRAM tier's directory gives (runtime.cache.hugepages): mountinfo and
sysfs parsing, and the directories a node refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.cache import hugepages
from runtime.cache.hugepages import Mount, dram_pages, huge_mode, mount_of, selected
from sllm.errors import ValidationFailed

MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /dev/shm rw,nosuid shared:2 - tmpfs tmpfs rw,size=24683792k
31 30 0:26 / /dev/shm rw,nosuid shared:3 - tmpfs tmpfs rw,size=1g,huge=within_size
40 22 0:30 / /mnt/huge\\040dir rw - tmpfs none rw,huge=always
41 22 0:31 / /mnt/hugetlb rw - hugetlbfs none rw,pagesize=2M
"""


def test_mount_of_takes_the_longest_mount_point_and_the_top_of_a_stack() -> None:
    assert mount_of("/dev/shm/sllm-0-node", MOUNTINFO) == Mount(
        "/dev/shm", "tmpfs", ("rw", "size=1g", "huge=within_size")
    )
    assert mount_of("/dev/shmother", MOUNTINFO) == Mount("/", "ext4", ("rw",))
    assert mount_of("/", MOUNTINFO) == Mount("/", "ext4", ("rw",))
    assert mount_of("/mnt/huge dir/x", MOUNTINFO) == Mount(
        "/mnt/huge dir", "tmpfs", ("rw", "huge=always")
    )
    assert mount_of("/x", "garbage\n") is None


def test_huge_mode_reads_the_mount_option_unless_sysfs_forces_it() -> None:
    plain = Mount("/dev/shm", "tmpfs", ("rw", "size=1g"))
    huge = Mount("/h", "tmpfs", ("rw", "huge=within_size"))
    assert huge_mode(plain, "never") == "never"
    assert huge_mode(huge, "never") == "within_size"
    assert huge_mode(huge, "deny") == "never"
    assert huge_mode(plain, "force") == "always"
    assert huge_mode(Mount("/", "ext4", ("rw",)), "force") == ""
    assert huge_mode(None, "") == ""
    assert selected("always within_size advise [never] deny force") == "never"
    assert selected("") == ""


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    info = tmp_path / "mountinfo"
    shmem = tmp_path / "shmem_enabled"
    monkeypatch.setattr(hugepages, "MOUNTINFO", info)
    monkeypatch.setattr(hugepages, "SHMEM_ENABLED", shmem)
    shmem.write_text("always within_size advise [never] deny force\n")
    return info


def _mounted(info: Path, point: Path, fstype: str, options: str) -> None:
    info.write_text(
        f"22 1 254:1 / / rw - ext4 /dev/vda rw\n40 22 0:30 / {point} rw - {fstype} none {options}\n"
    )


def test_dram_pages_says_what_a_tmpfs_gives(fake_proc: Path, tmp_path: Path) -> None:
    _mounted(fake_proc, tmp_path, "tmpfs", "rw,huge=within_size")
    pages = dram_pages(tmp_path)
    assert pages.huge_pages and pages.huge == "within_size"
    assert "2 MiB pages (huge=within_size)" in pages.describe()
    _mounted(fake_proc, tmp_path, "tmpfs", "rw,size=1g")
    pages = dram_pages(tmp_path)
    assert not pages.huge_pages
    assert "4 KiB pages" in pages.describe() and "huge=within_size" in pages.describe()
    _mounted(fake_proc, tmp_path, "tmpfs", "rw,huge=advise")  # fallocate asks for no huge page
    assert not dram_pages(tmp_path).huge_pages


def test_dram_pages_refuses_what_cannot_hold_the_tier(fake_proc: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="not a directory"):
        dram_pages(tmp_path / "missing")
    _mounted(fake_proc, tmp_path, "hugetlbfs", "rw,pagesize=2M")
    with pytest.raises(ValidationFailed, match=r"hugetlbfs .* huge=within_size"):
        dram_pages(tmp_path)
    fake_proc.write_text("22 1 254:1 / / rw - ext4 /dev/vda rw\n")
    with pytest.raises(ValidationFailed, match=r"on ext4 .*not in memory"):
        dram_pages(tmp_path)
