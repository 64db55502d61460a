"""DRAM tier: checkpoint images in shared memory, LRU over entries no instance uses.

An entry is a directory in shared memory (default under /dev/shm)::

    image.bin    all partitions back to back (``runtime.ckpt.index.image_layout``)
    index.json   the checkpoint index
    config.json, tokenizer.json, ...  the checkpoint's extra files

An instance process maps ``image.bin`` read-only with ``map_image`` and gets zero-copy tensor
views of it (``runtime.loader.cpu.entry_tensors``); on CUDA the instance copies the mapping to
its device chunk by chunk, page-locking each chunk as it goes (``runtime.loader.cuda``). The node pins an entry with ``acquire``
for as long as an instance uses it; only unpinned entries are evicted.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.cache.entries import EntryDirectory, EntryTier, Reservation
from runtime.ckpt.index import INDEX_FILE, CheckpointIndex, image_layout, read_index
from runtime.loader.direct_io import populate_write
from sllm.errors import CacheFull, CheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_FILE = "image.bin"
DEFAULT_ROOT = Path("/dev/shm")
_POPULATE_STEP = 64 << 20


@dataclass
class _Slab:
    """Free shared memory (a file in ``free/``) and the node's writable mapping of it, its page
    tables populated; None where this process never mapped it (an entry adopted at start)."""

    size: int
    mapping: mmap.mmap | None


def image_size(index: CheckpointIndex) -> int:
    return image_layout(index)[1]


def _validate(entry: Path) -> int:
    index = read_index(entry)
    image = entry / IMAGE_FILE
    size = image.stat().st_size
    if size != image_size(index):
        raise CheckpointError(f"{image}: {size} bytes, the index needs {image_size(index)}")
    return sum(f.stat().st_size for f in entry.iterdir())


class DramCache(EntryTier):
    """The DRAM tier. Thread-safe; ``acquire``/``release`` are the instance refcounts.

    Evicted images are not freed but kept as *slabs* in ``free/`` and reused by the next
    entry (resized with ftruncate/fallocate): on this VM, fresh shared memory costs
    0.8-1 s/GB to allocate and touch, against ~0.1 s/GB to map a slab already resident
    (measured, DESIGN.md "This machine"). Slabs count against the capacity and are trimmed
    first when space is needed. ``preallocate`` makes one at start-up.

    The node keeps the writable mapping each image was written through for as long as the
    image lives (entry, then slab), so a load into a reused slab takes no page fault at all:
    a page cached read into it is a plain copy (measured: 2 GB warm, 0.46-0.95 s into a
    populated mapping against 1.3-2.2 s faulting each 4 KiB page in). The mappings cost no
    memory beyond their page tables (2 MB per GB); the pages are the images'.
    """

    tier = "dram"

    def __init__(self, root: Path | None = None, capacity: int = 8 << 30) -> None:
        root = DEFAULT_ROOT / f"sllm-{os.getuid()}" if root is None else Path(root)
        self._free_dir = root / "free"
        self._pool: dict[Path, _Slab] = {}
        # entry directory -> the mapping its image was written through (see the class doc)
        self._mappings: dict[Path, mmap.mmap] = {}
        self._pool_lock = threading.Lock()
        # Slabs left by a previous run: memory nobody accounts for, so free it.
        if self._free_dir.exists():
            shutil.rmtree(self._free_dir)
        self._free_dir.mkdir(parents=True)
        self.entries = EntryDirectory(root, capacity, "dram", _validate, on_drop=self._recycle)
        # Entries a smaller capacity evicted at start became slabs: free those above it now
        # (issue 14), rather than holding the memory until the next load trims the pool.
        self._trim_pool()

    def _recycle(self, entry: Path) -> None:
        with self._pool_lock:
            mapping = self._mappings.pop(entry, None)
        image = entry / IMAGE_FILE
        try:
            size = image.stat().st_size
            if size:
                slab = self._free_dir / f"{uuid.uuid4().hex}.bin"
                os.replace(image, slab)
        except OSError:
            size = 0
            raise
        finally:
            if mapping is not None and len(mapping) != size:
                _close_in_background(mapping)
                mapping = None
        if size == 0:
            return
        with self._pool_lock:
            self._pool[slab] = _Slab(size, mapping)

    def _keep_mapping(self, entry: Path, mapping: mmap.mmap | None) -> None:
        """Hold ``mapping`` (the writer's, populated) for the entry at ``entry``; None forgets
        (and unmaps) what was held."""
        with self._pool_lock:
            old = self._mappings.pop(entry, None)
            if mapping is not None:
                self._mappings[entry] = mapping
        if old is not None:
            _close_in_background(old)

    def pool_bytes(self) -> int:
        with self._pool_lock:
            return sum(s.size for s in self._pool.values())

    def _take_slab(self, size: int) -> tuple[Path, _Slab] | None:
        """The smallest slab that holds ``size`` bytes, else the largest (it will grow)."""
        with self._pool_lock:
            if not self._pool:
                return None
            fits = [p for p, s in self._pool.items() if s.size >= size]
            slab = (
                min(fits, key=lambda p: self._pool[p].size)
                if fits
                else max(self._pool, key=lambda p: self._pool[p].size)
            )
            return slab, self._pool.pop(slab)

    def _trim_pool(self) -> None:
        """Free slabs (largest first) until entries + reservations + slabs fit the capacity."""
        budget = self.capacity - self.entries.used_bytes()
        with self._pool_lock:
            for slab in sorted(self._pool, key=lambda p: self._pool[p].size, reverse=True):
                if sum(s.size for s in self._pool.values()) <= budget:
                    break
                freed = self._pool.pop(slab)
                slab.unlink(missing_ok=True)
                if freed.mapping is not None:
                    _close_in_background(freed.mapping)

    def preallocate(self, nbytes: int) -> bool:
        """Allocate a slab of ``nbytes`` now (node start-up), mapped and with every page
        written once, so the first load into it pays neither for fresh pages nor for page
        faults; False if it would not fit next to what the tier holds.

        posix_fallocate alone is not enough on tmpfs: it reserves the pages but leaves them
        to be zeroed on first touch, which cost the first load 1.3-4 s per 2 GB here
        (measured) on top of its reads."""
        if self.entries.used_bytes() + self.pool_bytes() + nbytes > self.capacity:
            return False
        slab = self._free_dir / f"{uuid.uuid4().hex}.bin"
        fd = os.open(slab, os.O_RDWR | os.O_CREAT, 0o644)
        mapping: mmap.mmap | None = None
        try:
            os.posix_fallocate(fd, 0, nbytes)
            if nbytes:
                mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
                _populate(mapping, 0, nbytes, threading.Event())
        except OSError as exc:
            slab.unlink(missing_ok=True)
            raise CacheFull(
                f"dram cache at {self.root}: cannot allocate {nbytes} bytes ({exc.strerror})"
            ) from None
        finally:
            os.close(fd)
        with self._pool_lock:
            self._pool[slab] = _Slab(nbytes, mapping)
        return True

    def writer(
        self, key: str, index: CheckpointIndex, extra_bytes: int, populate: bool = True
    ) -> DramWriter:
        """Reserve the image plus ``extra_bytes`` (CacheFull before any byte is written).

        ``populate``: map the image's pages in a background thread ahead of the writers
        (MADV_POPULATE_WRITE, 64 MiB at a time). Measured here: socket reads into an
        unmapped shared-memory slab cost 0.48 s CPU/GB in page faults, into a populated one
        0.17 s/GB plus 0.07 s/GB to populate; in the background that is also off the
        critical path. Kernels without it (< 5.14) just fault pages in on first write."""
        res = self.entries.reserve(key, image_size(index) + extra_bytes)
        slab = self._take_slab(image_size(index))
        try:
            writer = DramWriter(self.entries, res, index, slab, populate, self._keep_mapping)
        except BaseException:
            if slab is not None:
                slab[0].unlink(missing_ok=True)
                if slab[1].mapping is not None:
                    _close_in_background(slab[1].mapping)
            self.entries.abort(res)
            raise
        self._trim_pool()
        return writer


class DramWriter:
    """Fills ``buffer`` (the image, writable shared memory), then ``finish`` or ``abort``.

    ``slab``: free shared memory to reuse (its file and, when the node holds one, its
    populated mapping, reused as is or resized); ``keep``: takes the mapping at ``finish``
    (the tier holds it for the entry's life), else it is unmapped."""

    def __init__(
        self,
        entries: EntryDirectory,
        res: Reservation,
        index: CheckpointIndex,
        slab: tuple[Path, _Slab] | None = None,
        populate: bool = True,
        keep: Callable[[Path, mmap.mmap | None], None] | None = None,
    ) -> None:
        self._entries = entries
        self._keep = keep
        self.res = res
        self.starts, self.size = image_layout(index)
        self._mm: mmap.mmap | None = None
        path = res.tmp / IMAGE_FILE
        have = 0
        mapping = None
        if slab is not None:
            os.replace(slab[0], path)
            have, mapping = slab[1].size, slab[1].mapping
        populated = 0  # bytes from the start whose page tables are populated
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.size > have:
                try:
                    # Allocate the shared-memory pages now: a full /dev/shm fails here, before
                    # any byte is downloaded, instead of SIGBUS on a later write.
                    os.posix_fallocate(fd, have, self.size - have)
                except OSError as exc:
                    if mapping is not None:
                        _close_in_background(mapping)
                    raise CacheFull(
                        f"dram cache at {entries.root}: cannot allocate {self.size} bytes "
                        f"of shared memory ({exc.strerror})"
                    ) from None
            if mapping is not None and self.size and _resize(mapping, self.size):
                self._mm, populated = mapping, min(have, self.size)
            else:
                if mapping is not None:
                    _close_in_background(mapping)
                if have > self.size:
                    os.ftruncate(fd, self.size)
                if self.size:
                    self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.buffer = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        # bytes from the start whose page tables a reused slab brought populated
        self.populated = populated if self._mm is not None else 0
        self._stop_populate = threading.Event()
        self._populator: threading.Thread | None = None
        if populate and self._mm is not None and populated < self.size:
            self._populator = threading.Thread(
                target=_populate,
                args=(self._mm, populated, self.size, self._stop_populate),
                name="dram-populate",
                daemon=True,
            )
            self._populator.start()

    @property
    def image_path(self) -> Path:
        """The image being written (valid until finish/abort; a mapping of it stays valid)."""
        return self.res.tmp / IMAGE_FILE

    def partition_view(self, partition: int, nbytes: int) -> memoryview:
        start = self.starts[partition]
        return self.buffer[start : start + nbytes]

    def finish(self, index_json: bytes, files: dict[str, bytes], acquire: bool = False) -> Path:
        """Write index and files, make the entry visible (``acquire``: pinned) and hand the
        mapping to the tier (or unmap it)."""
        for name, data in files.items():
            (self.res.tmp / name).write_bytes(data)
        (self.res.tmp / INDEX_FILE).write_bytes(index_json)
        mapping = self._release()
        if self._keep is None:
            if mapping is not None:
                _close_in_background(mapping)
            return self._entries.commit(self.res, acquire)
        # Held before the commit: once committed the entry may be evicted (then recycled
        # with this mapping) at any moment. Its key is reserved, so no entry has this path.
        final = self._entries.path(self.res.key)
        self._keep(final, mapping)
        try:
            return self._entries.commit(self.res, acquire)
        except BaseException:
            self._keep(final, None)
            raise

    def abort(self) -> None:
        mapping = self._release()
        if mapping is not None:
            _close_in_background(mapping)
        self._entries.abort(self.res)

    def _release(self) -> mmap.mmap | None:
        self._stop_populate.set()
        if self._populator is not None:
            self._populator.join()  # at most one 64 MiB step (~10 ms)
        self.buffer.release()
        mapping, self._mm = self._mm, None
        return mapping


def _resize(mapping: mmap.mmap, size: int) -> bool:
    """Resize a slab's mapping and its file to ``size``; mremap keeps the populated page
    tables of what stays. False if it cannot (a slice of it still alive elsewhere)."""
    if len(mapping) == size:
        return True
    try:
        mapping.resize(size)  # ftruncate of the file, then mremap
    except (BufferError, OSError):
        return False
    return True


def _populate(mm: mmap.mmap, start: int, end: int, stop: threading.Event) -> None:
    """Populate the page tables of ``mm[start:end]`` for writing, 64 MiB at a time."""
    # populate_write lets go of the GIL during the call: mmap.madvise keeps it, and a 64 MiB
    # populate step then stalled the download threads for up to ~140 ms (measured).
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor  # the address stays valid while ``mm`` is open (it is joined before close)
    for off in range(start, end, _POPULATE_STEP):
        if stop.is_set():
            return
        if not populate_write(base + off, min(_POPULATE_STEP, end - off)):
            return  # not supported here (Linux < 5.14): pages fault in on first write


def _close_in_background(mm: mmap.mmap) -> None:
    # munmap of a written shared mapping costs ~0.3 s/GB on this VM (page-table teardown):
    # off the caller's critical path. The pages stay in the file while it has a name.
    threading.Thread(target=_close_mapping, args=(mm,), daemon=True).start()


def _close_mapping(mm: mmap.mmap) -> None:
    # A slice still held elsewhere keeps the mapping; it is freed with that slice.
    with contextlib.suppress(BufferError):
        mm.close()


def map_image(path: Path, index: CheckpointIndex) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a DRAM image read-only: ``(mapping, uint8 tensor over all of it)``, zero-copy.

    ``path`` is an entry's image.bin (or its directory). Keep the mapping alive as long as any
    view of the tensor is used. Touches no CUDA state: an instance pins what it copies to its
    device only once that device is selected (``runtime.loader.cuda``).
    """
    from runtime.loader.cpu import image_from_buffer

    path = Path(path)
    if path.is_dir():
        path = path / IMAGE_FILE
    size = image_size(index)
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise CheckpointError(f"{path}: image is {actual} bytes, the index needs {size}")
        if size == 0:
            raise CheckpointError(f"{path}: empty image (the checkpoint has no tensors)")
        mm = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    # a read-only tensor: the mapping is PROT_READ, a write through a view would fault
    return mm, image_from_buffer(mm)
