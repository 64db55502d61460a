"""``TieredCache``: bring a checkpoint to a ready DRAM image from the best tier holding it.

``fetch(key)`` looks in DRAM, then SSD, then the store, and returns with the DRAM entry
acquired (the caller releases it when its instance stops). Concurrent fetches of one key
share one load (the first caller does it, the others wait for it). A store pull streams
chunks into DRAM (``pull.pull_partitions``); once the image is complete, a write-behind thread
(``writeback.SsdWriteBehind``) copies it onto the SSD entry, fdatasyncs and renames it in the
background, so DRAM-ready is the download time, not download plus disk write. The copy waits
for the pull rather than following it chunk by chunk: beside the pull, its writes cost the
download 0.2-0.3 s per GB on the 2-core VM (1 GB from SeaweedFS, medians of 4: 1.15 GB/s
with the copy beside it, 1.46 GB/s with it after, curl 1.55 GB/s; 2026-12-05), while the
disk took ~10 s for the copy either way.
Every load reports a ``HopStat`` per hop, folded into the ``BandwidthEstimator``.
Nothing is left half-cached on an error: both writers abort and remove their temp dirs.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runtime.cache.bandwidth import BandwidthEstimator, HopStat
from runtime.cache.dram import IMAGE_FILE, DramCache
from runtime.cache.pull import pull_partitions
from runtime.cache.ssd import SsdCache, SsdWriter, entry_bytes
from runtime.cache.writeback import SsdWriteBehind
from runtime.ckpt.index import INDEX_FILE, CheckpointIndex, parse_index, read_index
from runtime.loader.read import THREADS as DISK_THREADS
from runtime.loader.read import read_checkpoint
from runtime.store.base import Store, join_key
from sllm.clock import Clock, SystemClock
from sllm.errors import CheckpointError, Conflict

log = logging.getLogger(__name__)

FetchTier = Literal["dram", "ssd", "store"]


@dataclass(frozen=True)
class FetchResult:
    """A ready DRAM image. ``tier``: where the bytes came from for this load (a waiter that
    shared another caller's load reports that load's tier); ``hops``: per-hop transfers this
    call performed (empty for a DRAM hit or a shared load); ``seconds``: call to ready."""

    key: str
    tier: FetchTier
    directory: Path
    index: CheckpointIndex
    nbytes: int
    hops: tuple[HopStat, ...]
    seconds: float

    @property
    def image_path(self) -> Path:
        return self.directory / IMAGE_FILE


class TieredCache:
    def __init__(
        self,
        store: Store,
        ssd: SsdCache,
        dram: DramCache,
        bandwidths: BandwidthEstimator,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.ssd = ssd
        self.dram = dram
        self.bandwidths = bandwidths
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[tuple[FetchTier, tuple[HopStat, ...]]]] = {}
        # One thread: SSD commits are disk-bound, running them one at a time keeps order.
        self._commits = ThreadPoolExecutor(1, thread_name_prefix="ssd-commit")
        # Download threads live as long as the cache (pulls of different keys share them).
        self._downloads = ThreadPoolExecutor(store.concurrency, thread_name_prefix="pull")
        self._disk_reads = ThreadPoolExecutor(DISK_THREADS, thread_name_prefix="disk-read")
        self._pending: list[Future[None]] = []

    def fetch(self, key: str) -> FetchResult:
        """Blocking; thread-safe. Raises StoreError, CheckpointError or CacheFull."""
        start = self._clock.now()
        while True:
            directory = self.dram.acquire(key)
            if directory is not None:
                return self._result(key, "dram", directory, (), start)
            with self._lock:
                fut = self._inflight.get(key)
                leader = fut is None
                if fut is None:
                    fut = self._inflight[key] = Future()
            if not leader:
                tier, _hops = fut.result()
                directory = self.dram.acquire(key)
                if directory is not None:
                    return self._result(key, tier, directory, (), start)
                continue  # evicted between the load and this acquire: load again
            try:
                tier, directory, hops = self._load(key)
                fut.set_result((tier, hops))
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            finally:
                with self._lock:
                    del self._inflight[key]
            for hop in hops:
                self.bandwidths.observe(hop)
            return self._result(key, tier, directory, hops, start)

    def release(self, key: str) -> None:
        """Unpin the DRAM entry a ``fetch`` acquired (once per fetch)."""
        self.dram.release(key)

    def contents(self) -> dict[str, list[tuple[str, int, bool]]]:
        """``{"dram": [...], "ssd": [...]}`` of ``(key, nbytes, in_use)``, for heartbeats."""
        return {"dram": self.dram.contents(), "ssd": self.ssd.contents()}

    def flush(self) -> None:
        """Wait for background SSD commits (tests, benchmarks, shutdown)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def close(self) -> None:
        self.flush()
        self._commits.shutdown(wait=True)
        self._downloads.shutdown(wait=True)
        self._disk_reads.shutdown(wait=True)

    def _result(
        self,
        key: str,
        tier: FetchTier,
        directory: Path,
        hops: tuple[HopStat, ...],
        start: float,
    ) -> FetchResult:
        index = read_index(directory)
        return FetchResult(
            key, tier, directory, index, index.total_bytes, hops, self._clock.now() - start
        )

    def _load(self, key: str) -> tuple[FetchTier, Path, tuple[HopStat, ...]]:
        ssd_dir = self.ssd.acquire(key)
        if ssd_dir is not None:
            try:
                directory, hop = self._from_ssd(key, ssd_dir)
            finally:
                self.ssd.release(key)
            return "ssd", directory, (hop,)
        directory, hop = self._from_store(key)
        return "store", directory, (hop,)

    def _from_ssd(self, key: str, ssd_dir: Path) -> tuple[Path, HopStat]:
        start = self._clock.now()
        index = read_index(ssd_dir)
        index_json = (ssd_dir / INDEX_FILE).read_bytes()
        files = {name: (ssd_dir / name).read_bytes() for name in index.files}
        extra = len(index_json) + sum(len(d) for d in files.values())
        # No background populate here: O_DIRECT reads fault the pages in from the kernel
        # as cheaply, and populating alongside them made SSD loads ~10% slower (measured).
        writer = self.dram.writer(key, index, extra, populate=False)
        try:
            # the loader's one reader, the same code bench/load.py measures
            read_checkpoint(
                ssd_dir,
                index,
                writer.buffer,
                executor=self._disk_reads,
                populated=writer.populated,
            )
        except BaseException:
            writer.abort()
            raise
        directory = writer.finish(index_json, files, acquire=True)
        hop = HopStat("ssd", index.total_bytes, self._clock.now() - start)
        log.info("cache loaded key=%s from=ssd bytes=%d s=%.3f", key, hop.nbytes, hop.seconds)
        return directory, hop

    def _from_store(self, key: str) -> tuple[Path, HopStat]:
        start = self._clock.now()
        index_key = join_key(key, INDEX_FILE)
        index_json = self.store.get_bytes(index_key)
        try:
            index = parse_index(json.loads(index_json), self.store.describe(index_key))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{self.store.describe(index_key)}: garbled index, not valid JSON ({exc})"
            ) from None
        files = {name: self.store.get_bytes(join_key(key, name)) for name in index.files}
        extra = len(index_json) + sum(len(d) for d in files.values())
        # Both reservations happen before any byte is written: a too-small tier fails here.
        dram_w = self.dram.writer(key, index, extra)
        ssd_w: SsdWriter | None = None
        try:
            ssd_w = self.ssd.writer(
                key, index, entry_bytes(index, extra - len(index_json), len(index_json))
            )
        except Conflict:
            ssd_w = None  # an earlier pull's SSD commit is still finishing: it will land
        except BaseException:
            dram_w.abort()
            raise
        behind: SsdWriteBehind | None = None
        try:
            pull_partitions(self.store, key, index, dram_w, executor=self._downloads)
            if ssd_w is not None:
                behind = SsdWriteBehind(ssd_w, dram_w.image_path, index)
        except BaseException:
            if ssd_w is not None:
                ssd_w.abort()
            dram_w.abort()
            raise
        try:
            directory = dram_w.finish(index_json, files, acquire=True)
        except BaseException:
            if behind is not None:
                behind.abort()
            raise
        hop = HopStat("store", index.total_bytes, self._clock.now() - start)
        log.info("cache loaded key=%s from=store bytes=%d s=%.3f", key, hop.nbytes, hop.seconds)
        if behind is not None:
            writeback = behind
            # The write-behind reads the DRAM image: pin it until the copy is done, or an
            # eviction could recycle the image for another checkpoint mid-copy.
            self.dram.acquire(key)

            def commit() -> None:
                try:
                    writeback.finish(index_json, files)
                finally:
                    self.dram.release(key)

            with self._lock:
                self._pending = [f for f in self._pending if not f.done()]
                self._pending.append(self._commits.submit(commit))
        return directory, hop
