"""DRAM tier: checkpoint images in shared memory, LRU over entries no instance uses.

An entry is a directory in shared memory (default under /dev/shm)::

    image.bin    all partitions back to back (``runtime.ckpt.index.image_layout``)
    index.json   the checkpoint index
    config.json, tokenizer.json, ...  the checkpoint's extra files

An instance process maps ``image.bin`` read-only with ``map_image`` and gets zero-copy tensor
views of it (``runtime.loader.cpu.tensor_views``); on CUDA the mapping is registered as pinned
memory so host-to-device copies run at full speed. The node pins an entry with ``acquire``
for as long as an instance uses it; only unpinned entries are evicted.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.cache.entries import EntryDirectory, Reservation
from runtime.ckpt.index import INDEX_FILE, CheckpointIndex, image_layout, read_index
from sllm.errors import CacheFull, CheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_FILE = "image.bin"
DEFAULT_ROOT = Path("/dev/shm")
# cudaHostRegisterReadOnly: the mapping is PROT_READ, so CUDA must not ask for write access.
_CUDA_HOST_REGISTER_READ_ONLY = 0x08


def image_size(index: CheckpointIndex) -> int:
    return image_layout(index)[1]


def _validate(entry: Path) -> int:
    index = read_index(entry)
    image = entry / IMAGE_FILE
    size = image.stat().st_size
    if size != image_size(index):
        raise CheckpointError(f"{image}: {size} bytes, the index needs {image_size(index)}")
    return sum(f.stat().st_size for f in entry.iterdir())


class DramCache:
    """The DRAM tier. Thread-safe; ``acquire``/``release`` are the instance refcounts."""

    tier = "dram"

    def __init__(self, root: Path | None = None, capacity: int = 8 << 30) -> None:
        root = DEFAULT_ROOT / f"sllm-{os.getuid()}" if root is None else Path(root)
        self.entries = EntryDirectory(root, capacity, "dram", _validate)

    @property
    def root(self) -> Path:
        return self.entries.root

    @property
    def capacity(self) -> int:
        return self.entries.capacity

    def acquire(self, key: str) -> Path | None:
        """The entry directory (image.bin, index.json, files), pinned; None if absent."""
        return self.entries.acquire(key)

    def release(self, key: str) -> None:
        self.entries.release(key)

    def contents(self) -> list[tuple[str, int, bool]]:
        return self.entries.contents()

    def writer(self, key: str, index: CheckpointIndex, extra_bytes: int) -> DramWriter:
        """Reserve the image plus ``extra_bytes`` (CacheFull before any byte is written)."""
        res = self.entries.reserve(key, image_size(index) + extra_bytes)
        try:
            return DramWriter(self.entries, res, index)
        except BaseException:
            self.entries.abort(res)
            raise


class DramWriter:
    """Fills ``buffer`` (the image, writable shared memory), then ``finish`` or ``abort``."""

    def __init__(self, entries: EntryDirectory, res: Reservation, index: CheckpointIndex) -> None:
        self._entries = entries
        self.res = res
        self.starts, self.size = image_layout(index)
        self._mm: mmap.mmap | None = None
        fd = os.open(res.tmp / IMAGE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.size:
                try:
                    # Allocate the shared-memory pages now: a full /dev/shm fails here, before
                    # any byte is downloaded, instead of SIGBUS on a later write.
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as exc:
                    raise CacheFull(
                        f"dram cache at {entries.root}: cannot allocate {self.size} bytes "
                        f"of shared memory ({exc.strerror})"
                    ) from None
                self._mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.buffer = memoryview(self._mm) if self._mm is not None else memoryview(b"")

    def partition_view(self, partition: int, nbytes: int) -> memoryview:
        start = self.starts[partition]
        return self.buffer[start : start + nbytes]

    def finish(self, index_json: bytes, files: dict[str, bytes], acquire: bool = False) -> Path:
        """Write index and files, unmap, make the entry visible (``acquire``: pinned)."""
        for name, data in files.items():
            (self.res.tmp / name).write_bytes(data)
        (self.res.tmp / INDEX_FILE).write_bytes(index_json)
        self._unmap()
        return self._entries.commit(self.res, acquire)

    def abort(self) -> None:
        self._unmap()
        self._entries.abort(self.res)

    def _unmap(self) -> None:
        self.buffer.release()
        if self._mm is not None:
            # A slice still held by a worker keeps the mapping; it is freed with that slice.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


def map_image(
    path: Path, index: CheckpointIndex, pin: bool | None = None
) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a DRAM image read-only: ``(mapping, uint8 tensor over all of it)``, zero-copy.

    ``path`` is an entry's image.bin (or its directory). Keep the mapping alive as long as any
    view of the tensor is used. ``pin`` (default: when CUDA is available) registers the
    region as page-locked memory so ``.to("cuda", non_blocking=True)`` copies run by DMA.
    """
    import torch

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
    with warnings.catch_warnings():
        # frombuffer warns that the buffer is not writable: that is the point (PROT_READ; a
        # write through the tensor would fault, so views must be treated as read-only).
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(mm, dtype=torch.uint8)
    if pin is None:
        pin = torch.cuda.is_available()
    if pin:
        _cuda_register(tensor)
    return mm, tensor


def _cuda_register(tensor: torch.Tensor) -> None:
    import torch

    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(
            tensor.data_ptr(), tensor.numel(), _CUDA_HOST_REGISTER_READ_ONLY
        )
    except (RuntimeError, AttributeError) as exc:
        log.warning("dram image not pinned (cudaHostRegister unavailable: %s)", exc)
        return
    if int(err) != 0:
        log.warning("dram image not pinned (cudaHostRegister returned %s)", err)
