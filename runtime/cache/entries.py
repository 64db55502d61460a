"""``EntryDirectory``: the bookkeeping both cache tiers share (SSD, DRAM).

Layout under ``root``::

    entries/<quoted key>/   complete entries (visible, servable)
    tmp/<quoted key>.<id>/  entries being written; renamed into entries/ only when complete

A rename is atomic, so a reader never sees a partial entry; ``tmp/`` left over by a crash is
removed at start, and every entry found at start is validated (a broken one is deleted).
Capacity is enforced when space is *reserved*, before any byte is written: eviction is
``policy.choose_victims`` over complete entries plus reservations (which count as in use).
Entries acquired by a reader (refcount > 0) are never evicted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from runtime.cache.policy import CacheEntry, choose_victims
from sllm.errors import CacheFull, Conflict, SllmError

log = logging.getLogger(__name__)

# validate(entry_dir) -> bytes the entry occupies; raises SllmError if it is broken.
Validator = Callable[[Path], int]
# on_drop(entry_dir) runs (lock held) just before an evicted or removed entry is deleted,
# so a tier can salvage parts of it (the DRAM tier recycles image files).
DropHook = Callable[[Path], None]


@dataclass
class _Entry:
    nbytes: int
    last_used: int
    refs: int = 0


@dataclass(frozen=True)
class Reservation:
    """Space held for an entry being written into ``tmp``."""

    key: str
    tmp: Path
    nbytes: int


class EntryDirectory:
    def __init__(
        self,
        root: Path,
        capacity: int,
        tier: str,
        validate: Validator,
        on_drop: DropHook | None = None,
    ) -> None:
        if capacity <= 0:
            raise CacheFull(f"{tier} cache capacity must be positive, got {capacity}")
        self.root = Path(root)
        self.capacity = capacity
        self.tier = tier
        self._entries_dir = self.root / "entries"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._reserved: dict[str, Reservation] = {}
        self._tick = 0
        self._on_drop = on_drop
        self._recover(validate)

    def _recover(self, validate: Validator) -> None:
        """Drop orphaned temp entries, adopt valid complete ones (LRU order from mtimes)."""
        if self._tmp_dir.exists():
            orphans = list(self._tmp_dir.iterdir())
            shutil.rmtree(self._tmp_dir)
            if orphans:
                log.info("%s cache removed %d orphaned partial entries", self.tier, len(orphans))
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        self._entries_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(self._entries_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        for path in found:
            try:
                nbytes = validate(path)
            except (SllmError, OSError) as exc:
                log.warning("%s cache dropped broken entry %s: %s", self.tier, path.name, exc)
                _remove(path)
                continue
            self._tick += 1
            self._entries[unquote(path.name)] = _Entry(nbytes, self._tick)
        used = self.used_bytes()
        if used > self.capacity:
            # Capacity shrank since the last run: evict down to the new size.
            with self._lock:
                self._evict_for(0)

    def path(self, key: str) -> Path:
        return self._entries_dir / quote(key, safe="")

    def used_bytes(self) -> int:
        """Bytes of complete entries plus reservations."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values()) + sum(
                r.nbytes for r in self._reserved.values()
            )

    def _snapshot(self) -> list[CacheEntry]:
        rows = [CacheEntry(k, e.nbytes, e.last_used, e.refs > 0) for k, e in self._entries.items()]
        rows += [CacheEntry(f"\0{k}", r.nbytes, 0, True) for k, r in self._reserved.items()]
        return rows

    def _evict_for(self, need: int) -> None:
        """Evict (lock held) so that ``need`` more bytes fit; CacheFull if they cannot."""
        try:
            victims = choose_victims(self._snapshot(), need, self.capacity)
        except CacheFull as exc:
            raise CacheFull(f"{self.tier} cache at {self.root}: {exc.message}") from None
        for key in victims:
            entry = self._entries.pop(key)
            self._drop(key)
            log.info("%s cache evicted key=%s bytes=%d", self.tier, key, entry.nbytes)

    def _drop(self, key: str) -> None:
        path = self.path(key)
        if self._on_drop is not None:
            try:
                self._on_drop(path)
            except OSError as exc:
                log.warning("%s cache could not recycle %s: %s", self.tier, path.name, exc)
        _remove(path)

    def reserve(self, key: str, nbytes: int) -> Reservation:
        """Hold ``nbytes`` for ``key`` (evicting LRU unused entries) and make its temp dir."""
        with self._lock:
            if key in self._entries or key in self._reserved:
                raise Conflict(f"{self.tier} cache already holds or is writing {key!r}")
            self._evict_for(nbytes)
            tmp = self._tmp_dir / f"{quote(key, safe='')}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            res = Reservation(key, tmp, nbytes)
            self._reserved[key] = res
            return res

    def commit(self, res: Reservation, acquire: bool = False) -> Path:
        """Make the written entry visible (atomic rename); ``acquire`` pins it at once, so
        no other thread's eviction can slip in between."""
        dst = self.path(res.key)
        with self._lock:
            os.replace(res.tmp, dst)
            del self._reserved[res.key]
            self._tick += 1
            self._entries[res.key] = _Entry(res.nbytes, self._tick, 1 if acquire else 0)
        log.info("%s cache added key=%s bytes=%d", self.tier, res.key, res.nbytes)
        return dst

    def abort(self, res: Reservation) -> None:
        """Discard a partial entry and its reservation."""
        _remove(res.tmp)
        with self._lock:
            self._reserved.pop(res.key, None)

    def acquire(self, key: str) -> Path | None:
        """Pin ``key`` (not evictable until ``release``) and mark it used; None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.refs += 1
            self._tick += 1
            entry.last_used = self._tick
        path = self.path(key)
        # The mtime carries the LRU order across restarts (``_recover`` sorts by it).
        with contextlib.suppress(OSError):
            os.utime(path)
        return path

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs == 0:
                raise Conflict(f"{self.tier} cache: release of {key!r}, which is not acquired")
            entry.refs -= 1

    def remove(self, key: str) -> bool:
        """Delete an unused entry now; False if it is absent or in use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs:
                return False
            del self._entries[key]
            self._drop(key)
            return True

    def contents(self) -> list[tuple[str, int, bool]]:
        """``(key, nbytes, in_use)`` of complete entries, most recently used first."""
        with self._lock:
            rows = sorted(self._entries.items(), key=lambda kv: -kv[1].last_used)
            return [(k, e.nbytes, e.refs > 0) for k, e in rows]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class EntryTier:
    """What both cache tiers expose by delegating to their ``EntryDirectory``: an entry is a
    directory under ``root``; ``acquire`` pins it against eviction until ``release``."""

    entries: EntryDirectory

    @property
    def root(self) -> Path:
        return self.entries.root

    @property
    def capacity(self) -> int:
        return self.entries.capacity

    def acquire(self, key: str) -> Path | None:
        """The entry's directory, pinned; None if not cached."""
        return self.entries.acquire(key)

    def release(self, key: str) -> None:
        self.entries.release(key)

    def contents(self) -> list[tuple[str, int, bool]]:
        """(key, bytes, in use) of every complete entry."""
        return self.entries.contents()
