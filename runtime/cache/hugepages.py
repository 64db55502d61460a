"""Which page size the DRAM tier's shared memory gets (``SLLM_DRAM_DIR``).

A DRAM image is a file in a tmpfs, mapped by the node (to write it) and by every instance (to
read it). With 4 KiB pages each mapping of a 1 GB image needs 262,144 page-table entries: on
this VM populating them took 89-158 ms per process, and allocating fresh memory 0.6-0.7 s/GB.
A tmpfs mounted with ``huge=within_size`` (or ``always``) backs files with 2 MiB pages: the
same mapping took 0.8 ms and the allocation 0.04-0.25 s/GB (1-2 GB, several runs each),
except the first use of memory this VM had not touched since boot (2 GB: 4.6 s, which
``SLLM_DRAM_PREALLOCATE`` moves to the node's start).

Linux decides per mount: the ``huge=`` option of a tmpfs mount, overridden by
``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` when that says ``force`` or ``deny``
(its other values govern only the kernel's internal mount: memfd, SysV shm, shared anonymous
memory). /dev/shm is usually mounted without ``huge=``, so the node reports what it got and
docs/tiers.md says how to mount one that has them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sllm.errors import ValidationFailed

SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
MOUNTINFO = Path("/proc/self/mountinfo")
# tmpfs huge= values that give the tier's files 2 MiB pages. Not "advise": that needs
# MADV_HUGEPAGE on a mapping before its pages are allocated, and the tier allocates an image's
# pages with posix_fallocate (a full tier fails before the download), where no mapping asks.
HUGE_MODES = ("always", "within_size")
MEMORY_FS = ("tmpfs", "ramfs")


@dataclass(frozen=True)
class Mount:
    """The mount a path lives on: its mount point, file system type and super options."""

    point: str
    fstype: str
    options: tuple[str, ...]

    def option(self, name: str) -> str | None:
        for opt in self.options:
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str, mountinfo: str) -> Mount | None:
    """The mount ``path`` (absolute, symlinks resolved) is on, from mountinfo text: the
    longest mount point above it, the last one listed where mounts are stacked."""
    best: Mount | None = None
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        point = _unescape(fields[4])
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.point)):
            best = Mount(point, rest[0], tuple(rest[2].split(",")))
    return best


def selected(text: str) -> str:
    """The bracketed choice of a sysfs setting ("always [never] deny" -> "never")."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return ""


def huge_mode(mount: Mount | None, shmem_enabled: str) -> str:
    """The effective huge-page mode of files on ``mount``: a tmpfs's ``huge=`` option
    ("never" without one), unless ``shmem_enabled`` forces it on ("force") or off ("deny");
    "" for a mount that is not a tmpfs."""
    if mount is None or mount.fstype != "tmpfs":
        return ""
    if shmem_enabled == "deny":
        return "never"
    if shmem_enabled == "force":
        return "always"
    return mount.option("huge") or "never"


@dataclass(frozen=True)
class DramPages:
    """What the DRAM tier's directory gives: its mount and effective huge-page mode."""

    directory: Path
    mount: Mount | None
    huge: str  # the tmpfs huge= mode (always, within_size, advise, never); "" if not tmpfs

    @property
    def huge_pages(self) -> bool:
        return self.huge in HUGE_MODES

    def describe(self) -> str:
        where = str(self.directory)
        if self.mount is not None:
            where += f" ({self.mount.fstype} on {self.mount.point})"
        if self.huge_pages:
            return f"{where}: 2 MiB pages (huge={self.huge})"
        return (
            f"{where}: 4 KiB pages; a tmpfs mounted with huge=within_size as SLLM_DRAM_DIR maps "
            "images ~100x faster (docs/tiers.md)"
        )


def dram_pages(directory: Path) -> DramPages:
    """Check ``directory`` for the DRAM tier and say what pages it gives.

    Raises ValidationFailed when it is not a directory, not in memory (a disk's file system
    would make the tier a disk cache), or a hugetlbfs (whose files take sizes in whole huge
    pages only: an image's size is arbitrary)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValidationFailed(f"SLLM_DRAM_DIR={str(directory)!r}: not a directory")
    try:
        mountinfo = MOUNTINFO.read_text(encoding="utf-8")
    except OSError:
        mountinfo = ""  # not Linux: no mount to say anything about
    try:
        shmem = selected(SHMEM_ENABLED.read_text(encoding="utf-8"))
    except OSError:
        shmem = ""
    mount = mount_of(os.path.realpath(directory), mountinfo)
    if mount is not None and mount.fstype == "hugetlbfs":
        raise ValidationFailed(
            f"SLLM_DRAM_DIR={str(directory)!r}: a hugetlbfs takes files in whole huge pages "
            "only; use a tmpfs mounted with huge=within_size"
        )
    if mount is not None and mount.fstype not in MEMORY_FS:
        raise ValidationFailed(
            f"SLLM_DRAM_DIR={str(directory)!r}: on {mount.fstype} ({mount.point}), not in "
            "memory; the DRAM tier needs a tmpfs (e.g. /dev/shm)"
        )
    return DramPages(directory, mount, huge_mode(mount, shmem))
