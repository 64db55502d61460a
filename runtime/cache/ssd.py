"""SSD tier: complete checkpoint directories on node-local disk, LRU, capacity in bytes.

An entry is a checkpoint directory (index.json, data-*.bin, extra files) exactly as in the
store. It is written by an ``SsdWriter`` into a temp dir, its partition checksums are checked
by the writer's caller before ``finish`` (the pull computes them while downloading), data is
fdatasync'ed and only then renamed into place: after a crash there is either a whole verified
entry or nothing (start-up removes temp dirs and entries whose files do not match the index).
A full disk mid-write raises ``CacheFull`` and the caller aborts (the temp dir is removed).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from runtime.cache.entries import EntryDirectory, EntryTier, Reservation
from runtime.ckpt.index import (
    ALIGNMENT,
    INDEX_FILE,
    CheckpointIndex,
    check_partition_sizes,
    read_index,
)
from sllm.errors import CacheFull, StoreError


def _validate(entry: Path) -> int:
    index = read_index(entry)
    check_partition_sizes(entry, index)
    return sum(f.stat().st_size for f in entry.iterdir())


def entry_bytes(index: CheckpointIndex, files_bytes: int, index_bytes: int) -> int:
    """Disk bytes of an SSD entry: partitions + extra files + index.json."""
    return index.total_bytes + files_bytes + index_bytes


class SsdCache(EntryTier):
    """The SSD tier. Thread-safe; ``acquire`` pins an entry against eviction until ``release``."""

    tier = "ssd"

    def __init__(self, root: Path, capacity: int) -> None:
        self.entries = EntryDirectory(Path(root), capacity, "ssd", _validate)

    def writer(self, key: str, index: CheckpointIndex, nbytes: int) -> SsdWriter:
        """Reserve ``nbytes`` (evicting, or CacheFull before any byte is written)."""
        return SsdWriter(self.entries, self.entries.reserve(key, nbytes), index)


class SsdWriter:
    """Writes one entry: ``write`` partition ranges (any order, any thread), ``put_file``,
    then ``finish(index_json)`` or ``abort()``.

    Block-aligned ranges are written with O_DIRECT where the filesystem allows it: the bytes
    go from the caller's (already resident) buffer to the disk without allocating page-cache
    pages, which on this VM stall the whole vCPU while the host backs them (DESIGN.md: fresh
    memory touches at 0.5-3.5 GB/s) and so slowed a concurrent download by ~25%. A range may
    run past the partition's end up to the next 4096 boundary (padding from the image);
    ``finish`` truncates each file to its size in the index.
    """

    def __init__(self, entries: EntryDirectory, res: Reservation, index: CheckpointIndex) -> None:
        self._entries = entries
        self.res = res
        self._sizes = [p.nbytes for p in index.partitions]
        self._fds: list[int] = []
        self._direct: list[int | None] = []
        try:
            for p in index.partitions:
                path = res.tmp / p.file
                self._fds.append(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
                self._direct.append(_open_direct(path))
        except OSError as exc:
            self.abort()
            raise self._error(exc, "creating partition files") from None

    def _error(self, exc: OSError, doing: str) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return CacheFull(
                f"ssd cache disk at {self._entries.root} is full while {doing} for "
                f"{self.res.key!r}; the partial entry was discarded"
            )
        return StoreError(f"ssd cache at {self._entries.root}: {doing} failed: {exc.strerror}")

    @property
    def direct(self) -> bool:
        """Whether aligned writes bypass the page cache (False on tmpfs and the like)."""
        return all(fd is not None for fd in self._direct)

    def write(self, partition: int, offset: int, data: memoryview) -> None:
        direct = self._direct[partition]
        aligned = offset % ALIGNMENT == 0 and len(data) % ALIGNMENT == 0
        fd = direct if direct is not None and aligned else self._fds[partition]
        pos = 0
        try:
            while pos < len(data):
                pos += os.pwrite(fd, data[pos:], offset + pos)
        except OSError as exc:
            raise self._error(exc, "writing") from None

    def put_file(self, name: str, data: bytes) -> None:
        try:
            (self.res.tmp / name).write_bytes(data)
        except OSError as exc:
            raise self._error(exc, f"writing {name}") from None

    def finish(self, index_json: bytes) -> Path:
        """Truncate the padding, fdatasync, write index.json last, rename into place."""
        try:
            for fd, size in zip(self._fds, self._sizes, strict=True):
                os.ftruncate(fd, size)
                os.fdatasync(fd)
            self._close()
            tmp_index = self.res.tmp / INDEX_FILE
            with open(tmp_index, "wb") as f:
                f.write(index_json)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.abort()
            raise self._error(exc, "syncing") from None
        return self._entries.commit(self.res)

    def abort(self) -> None:
        self._close()
        self._entries.abort(self.res)

    def _close(self) -> None:
        for fd in [*self._fds, *self._direct]:
            if fd is not None:
                os.close(fd)
        self._fds = []
        self._direct = []


def _open_direct(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None  # tmpfs and some filesystems refuse O_DIRECT: buffered writes only
