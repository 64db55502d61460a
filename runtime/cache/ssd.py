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

from runtime.cache.entries import EntryDirectory, Reservation
from runtime.ckpt.index import INDEX_FILE, CheckpointIndex, check_partition_sizes, read_index
from sllm.errors import CacheFull, StoreError


def _validate(entry: Path) -> int:
    index = read_index(entry)
    check_partition_sizes(entry, index)
    return sum(f.stat().st_size for f in entry.iterdir())


def entry_bytes(index: CheckpointIndex, files_bytes: int, index_bytes: int) -> int:
    """Disk bytes of an SSD entry: partitions + extra files + index.json."""
    return index.total_bytes + files_bytes + index_bytes


class SsdCache:
    """The SSD tier. Thread-safe; ``acquire`` pins an entry against eviction until ``release``."""

    tier = "ssd"

    def __init__(self, root: Path, capacity: int) -> None:
        self.entries = EntryDirectory(Path(root), capacity, "ssd", _validate)

    @property
    def root(self) -> Path:
        return self.entries.root

    @property
    def capacity(self) -> int:
        return self.entries.capacity

    def acquire(self, key: str) -> Path | None:
        """The entry's checkpoint directory, pinned; None if not cached."""
        return self.entries.acquire(key)

    def release(self, key: str) -> None:
        self.entries.release(key)

    def contents(self) -> list[tuple[str, int, bool]]:
        return self.entries.contents()

    def writer(self, key: str, index: CheckpointIndex, nbytes: int) -> SsdWriter:
        """Reserve ``nbytes`` (evicting, or CacheFull before any byte is written)."""
        return SsdWriter(self.entries, self.entries.reserve(key, nbytes), index)


class SsdWriter:
    """Writes one entry: ``write`` partition ranges (any order, any thread), ``put_file``,
    then ``finish(index_json)`` or ``abort()``."""

    def __init__(self, entries: EntryDirectory, res: Reservation, index: CheckpointIndex) -> None:
        self._entries = entries
        self.res = res
        self._fds: list[int] = []
        try:
            for p in index.partitions:
                self._fds.append(os.open(res.tmp / p.file, os.O_WRONLY | os.O_CREAT, 0o644))
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

    def write(self, partition: int, offset: int, data: memoryview) -> None:
        fd = self._fds[partition]
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
        """fdatasync the data, write index.json last, rename into place."""
        try:
            for fd in self._fds:
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
        for fd in self._fds:
            os.close(fd)
        self._fds = []
