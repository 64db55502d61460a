"""Pipelined store pull: parallel ranged GETs straight into the DRAM image, each chunk written
on to the SSD entry as soon as it lands, partition checksums computed in order as chunks
complete. DRAM-ready time is therefore about the download time (issue 3, "Pipelining").

Threads: ``store.concurrency`` workers each GET one chunk into its place in the image and
pwrite it to the SSD temp file; the calling thread walks the chunks in order, waits for each,
and feeds it to the partition's hasher (xxh3 runs at >10 GB/s, far above loopback S3 rates).
On any failure the remaining chunks are cancelled and running ones awaited before the error
is raised, so the caller can abort both writers with no thread still writing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from runtime.cache.dram import DramWriter
from runtime.cache.ssd import SsdWriter
from runtime.ckpt.index import CheckpointIndex, new_hasher
from runtime.store.base import Progress, Store, join_key, no_progress
from sllm.errors import CacheFull, CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    partition: int
    offset: int
    nbytes: int


def plan_chunks(index: CheckpointIndex, chunk_bytes: int) -> list[Chunk]:
    """Chunks in partition order, each ``chunk_bytes`` except a partition's last."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return [
        Chunk(i, off, min(chunk_bytes, p.nbytes - off))
        for i, p in enumerate(index.partitions)
        for off in range(0, p.nbytes, chunk_bytes)
    ]


def pull_partitions(
    store: Store,
    key: str,
    index: CheckpointIndex,
    dram: DramWriter,
    ssd: SsdWriter | None,
    progress: Progress = no_progress,
) -> bool:
    """Download every partition of checkpoint ``key`` into ``dram`` (and ``ssd``), verifying
    checksums; raises ``CheckpointError`` on a mismatch, ``StoreError`` from the store.
    Returns False when the SSD copy failed (disk full: logged once, the download goes on to
    DRAM and the caller aborts the SSD writer). Does not finish or abort the writers."""
    chunks = plan_chunks(index, store.part_size)
    ssd_failed = threading.Event()
    sink: Callable[[Chunk], None] = _fetcher(store, key, index, dram, ssd, ssd_failed, progress)
    pool = ThreadPoolExecutor(store.concurrency, thread_name_prefix="pull")
    futures: list[Future[None]] = [pool.submit(sink, c) for c in chunks]
    try:
        hasher = new_hasher()
        for chunk, fut in zip(chunks, futures, strict=True):
            fut.result()
            view = dram.partition_view(chunk.partition, index.partitions[chunk.partition].nbytes)
            piece = view[chunk.offset : chunk.offset + chunk.nbytes]
            hasher.update(piece)
            piece.release()
            view.release()
            part = index.partitions[chunk.partition]
            if chunk.offset + chunk.nbytes == part.nbytes:
                got = hasher.hexdigest()
                if got != part.checksum:
                    raise CheckpointError(
                        f"{store.describe(join_key(key, part.file))}: checksum {got} does not "
                        f"match the index ({part.checksum}); the object in the store is corrupt"
                    )
                hasher = new_hasher()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return not ssd_failed.is_set()


def _fetcher(
    store: Store,
    key: str,
    index: CheckpointIndex,
    dram: DramWriter,
    ssd: SsdWriter | None,
    ssd_failed: threading.Event,
    progress: Progress,
) -> Callable[[Chunk], None]:
    objects = [join_key(key, p.file) for p in index.partitions]

    def fetch(chunk: Chunk) -> None:
        view = dram.partition_view(chunk.partition, index.partitions[chunk.partition].nbytes)
        piece = view[chunk.offset : chunk.offset + chunk.nbytes]
        try:
            store.read_range(objects[chunk.partition], chunk.offset, piece)
            if ssd is not None and not ssd_failed.is_set():
                try:
                    ssd.write(chunk.partition, chunk.offset, piece)
                except CacheFull as exc:
                    if not ssd_failed.is_set():
                        ssd_failed.set()
                        log.warning("ssd copy dropped key=%s: %s", key, exc)
        finally:
            piece.release()
            view.release()
        progress(chunk.nbytes)

    return fetch
