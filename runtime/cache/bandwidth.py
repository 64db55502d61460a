"""Learned bandwidths per tier: what the scheduler divides a checkpoint's size by.

``tier`` names where the bytes came from on their way to a ready DRAM image: ``store`` (a
pull), ``ssd`` (SSD -> DRAM), and ``dram`` (DRAM -> device, observed by whoever moves an
image onto its device; seeded by a memcpy probe). Each is an exponential moving average of
observed bytes/s, seeded at start by ``probe`` (a few tens of MiB, well under a second).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.loader.direct_io import read_full
from runtime.store.base import Store

# 1 MiB: smaller transfers are dominated by per-request latency and would skew the average.
MIN_OBSERVED_BYTES = 1 << 20
# Weight of a new observation: 0.3 follows a changed disk or link within ~3 loads while one
# outlier moves the estimate by under a third.
ALPHA = 0.3
# Seeds when nothing was probed (bytes/s): conservative figures of a loopback/LAN S3, a SATA
# SSD and memcpy, replaced by the first observation.
DEFAULT_SEEDS: dict[str, float] = {"store": 200e6, "ssd": 1e9, "dram": 5e9}
PROBE_BYTES = 32 << 20


@dataclass(frozen=True)
class HopStat:
    """``nbytes`` moved from ``tier`` into DRAM (or DRAM into the device) in ``seconds``."""

    tier: str
    nbytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


class BandwidthEstimator:
    """Thread-safe moving average of bytes/s per tier."""

    def __init__(self, seeds: dict[str, float] | None = None, alpha: float = ALPHA) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._bw = dict(DEFAULT_SEEDS if seeds is None else seeds)
        self._lock = threading.Lock()

    def seed(self, tier: str, bytes_per_s: float) -> None:
        """Replace the estimate outright (a probe result)."""
        if bytes_per_s > 0:
            with self._lock:
                self._bw[tier] = bytes_per_s

    def observe(self, stat: HopStat) -> None:
        """Fold one observed transfer into the tier's average (tiny ones are ignored)."""
        if stat.nbytes < MIN_OBSERVED_BYTES or stat.seconds <= 0:
            return
        with self._lock:
            old = self._bw.get(stat.tier)
            new = stat.bytes_per_s
            self._bw[stat.tier] = new if old is None else (1 - self.alpha) * old + self.alpha * new

    def get(self, tier: str) -> float:
        with self._lock:
            return self._bw.get(tier, DEFAULT_SEEDS.get(tier, 0.0))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._bw)

    def probe(
        self,
        ssd_dir: Path | None = None,
        store: Store | None = None,
        store_key: str | None = None,
        nbytes: int = PROBE_BYTES,
    ) -> dict[str, float]:
        """Measure each reachable tier briefly and seed the estimates; returns the seeds.

        ssd: write ``nbytes`` to a temp file, drop it from the page cache, read it back
        (O_DIRECT where supported). dram: one memcpy of ``nbytes``. store: a ranged GET of up
        to ``nbytes`` of ``store_key`` (skipped when no key is given)."""
        measured: dict[str, float] = {}
        src = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
        dst = bytearray(len(src))
        start = time.perf_counter()
        dst[:] = src
        measured["dram"] = len(src) / max(time.perf_counter() - start, 1e-9)
        if ssd_dir is not None:
            measured["ssd"] = _probe_disk(Path(ssd_dir), src)
        if store is not None and store_key is not None:
            size = min(store.size(store_key), nbytes)
            view = memoryview(dst)[:size]
            start = time.perf_counter()
            store.read_range(store_key, 0, view)
            measured["store"] = size / max(time.perf_counter() - start, 1e-9)
            view.release()
        for tier, value in measured.items():
            self.seed(tier, value)
        return measured


def _probe_disk(directory: Path, data: bytearray) -> float:
    import mmap

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".bw-probe-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        # O_DIRECT needs an aligned buffer: an anonymous mmap is page-aligned.
        buf = mmap.mmap(-1, len(data))
        view = memoryview(buf)
        try:
            flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
            try:
                fd = os.open(path, flags)
            except OSError:
                fd = os.open(path, os.O_RDONLY)
            try:
                start = time.perf_counter()
                got = read_full(fd, view, 0, len(data))
                return got / max(time.perf_counter() - start, 1e-9)
            finally:
                os.close(fd)
        finally:
            view.release()
            buf.close()
    finally:
        path.unlink(missing_ok=True)
