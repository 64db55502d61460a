"""``push_checkpoint``: upload a converted checkpoint directory to the store.

The directory is verified first (index, partition sizes, checksums, extra files), so a broken
checkpoint never reaches the store. Partitions and extra files go up first and ``index.json``
last: a reader treats a key as a checkpoint only once its index exists, so a push that dies
half-way is never seen as complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from runtime.ckpt.index import (
    INDEX_FILE,
    CheckpointIndex,
    check_partition_sizes,
    new_hasher,
    read_index,
)
from runtime.store.base import Progress, Store, join_key, no_progress
from sllm.errors import CheckpointError

log = logging.getLogger(__name__)

# 8 MiB: checksum read size; xxh3 runs at >10 GB/s so the disk sets the pace.
_HASH_CHUNK = 8 << 20


def verify_checkpoint(directory: Path, index: CheckpointIndex | None = None) -> CheckpointIndex:
    """Check every partition's size and checksum and that every extra file exists."""
    directory = Path(directory)
    index = read_index(directory) if index is None else index
    check_partition_sizes(directory, index)
    for p in index.partitions:
        h = new_hasher()
        with open(directory / p.file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        if h.hexdigest() != p.checksum:
            raise CheckpointError(
                f"{directory / p.file}: checksum {h.hexdigest()} does not match the index "
                f"({p.checksum}); the partition is corrupt"
            )
    for name in index.files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: listed in the index but missing")
    return index


def checkpoint_bytes(directory: Path, index: CheckpointIndex) -> int:
    """Bytes a push uploads: partitions, extra files and the index."""
    extra = sum((directory / n).stat().st_size for n in index.files)
    return index.total_bytes + extra + (directory / INDEX_FILE).stat().st_size


def push_checkpoint(
    directory: Path, store: Store, key: str, progress: Progress = no_progress
) -> CheckpointIndex:
    """Upload ``directory`` under ``key`` (index.json last); returns the verified index."""
    directory = Path(directory)
    index = verify_checkpoint(directory)
    names = [p.file for p in index.partitions] + list(index.files)
    for name in names:
        store.put_file(join_key(key, name), os.fspath(directory / name), progress)
    index_path = directory / INDEX_FILE
    store.put_bytes(join_key(key, INDEX_FILE), index_path.read_bytes())
    progress(index_path.stat().st_size)
    log.info("checkpoint pushed key=%s store=%s bytes=%d", key, store.url, index.total_bytes)
    return index
