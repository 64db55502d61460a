"""Bind mounts for instance containers (Linux, root).

A container is started before the node knows which function it will serve (the pre-started
pool), so its checkpoint cannot be a ``podman run -v`` argument. Instead each container gets a
directory of a *shared* mount (``slot``) as ``/sllm`` with slave propagation: whatever the node
mounts under the slot later appears inside the container, and disappears when unmounted.

DRAM entries are mounted read-only. A read-only remount does not propagate, so the entries are
bound from a read-only view of the whole DRAM tier (``ro_view``), whose flags each bind copies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: Path, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, str(target).encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def is_mount_point(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def make_shared(path: Path) -> None:
    """Make ``path`` a mount point of its own with shared propagation (idempotent)."""
    path.mkdir(parents=True, exist_ok=True)
    if not is_mount_point(path):
        _mount(str(path), path, MS_BIND)
    _mount(None, path, MS_SHARED)


def ro_view(source: Path, target: Path) -> None:
    """A private, read-only, nosuid/nodev/noexec bind of ``source`` at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    if is_mount_point(target):
        return
    _mount(str(source), target, MS_BIND | MS_REC)
    _mount(None, target, MS_PRIVATE | MS_REC)
    _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def bind(source: Path, target: Path) -> None:
    """Bind ``source`` (inside a read-only view: the bind is read-only too) at ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    _mount(str(source), target, MS_BIND)


def unmount(target: Path) -> None:
    """Detach the mount at ``target`` (and below); nothing mounted there is fine."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        if errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise OSError(errno, f"umount {target}: {os.strerror(errno)}")


def unmount_below(root: Path) -> None:
    """Detach every mount at or under ``root`` (a previous node's leftovers), deepest first."""
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        targets = [line.split()[4] for line in f]
    for target in sorted(
        {t for t in targets if t == prefix or t.startswith(prefix + "/")}, key=len, reverse=True
    ):
        unmount(Path(target))
