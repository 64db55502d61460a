"""SSD write-behind: copy a complete, verified DRAM image onto an SSD entry off the hot path.

Started once a store pull has filled and checked the image (tiered.py says why not beside
the pull): one background thread writes it, 16 MiB at a time, from its own read-only mapping
of the image (valid across the DRAM entry's rename; the caller keeps the entry pinned until
``finish``, so no eviction recycles the image underneath) into the SSD entry's partition
files, O_DIRECT where the filesystem allows (``SsdWriter``). This disk writes at ~100 MB/s
sustained, so the copy of a GB outlives the download by seconds; ``finish`` waits for it,
fdatasyncs and renames the entry into place. A full disk makes the copy stop and the entry
be discarded; the DRAM copy is unaffected.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from pathlib import Path

from runtime.cache.pull import plan_chunks
from runtime.cache.ssd import SsdWriter
from runtime.ckpt.index import CheckpointIndex, align_up, image_layout

log = logging.getLogger(__name__)

WRITEBACK_NICE = 19
# A multiple of 4096, so that every write but a partition's last is O_DIRECT-aligned as is.
COPY_CHUNK = 16 << 20


class SsdWriteBehind:
    def __init__(self, writer: SsdWriter, image_path: Path, index: CheckpointIndex) -> None:
        self.writer = writer
        self.error: BaseException | None = None
        self._starts, size = image_layout(index)
        self._chunks = plan_chunks(index, COPY_CHUNK)
        self._stopping = threading.Event()
        self._mm: mmap.mmap | None = None
        if size:
            with open(image_path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._thread = threading.Thread(
            target=self._run, name=f"ssd-writeback-{writer.res.key}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        # Lowest CPU priority for this thread only: its copy competes for cores with the
        # instance loading from the image and with serving, which requests wait on.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITEBACK_NICE)
        view = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        try:
            for chunk in self._chunks:
                if self._stopping.is_set():
                    return
                start = self._starts[chunk.partition] + chunk.offset
                # A partition's last chunk rounded up to 4096 (its slot in the image is):
                # an aligned write can go O_DIRECT; the writer truncates the padding.
                nbytes = align_up(chunk.nbytes) if self.writer.direct else chunk.nbytes
                piece = view[start : start + nbytes]
                try:
                    self.writer.write(chunk.partition, chunk.offset, piece)
                except BaseException as exc:
                    self.error = exc
                    log.warning("ssd copy dropped key=%s: %s", self.writer.res.key, exc)
                    return
                finally:
                    piece.release()
        finally:
            view.release()

    def _stop(self, abort: bool) -> None:
        if abort:
            self._stopping.set()
        self._thread.join()
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def finish(self, index_json: bytes, files: dict[str, bytes]) -> Path | None:
        """Wait for the copy, then commit the entry; None (entry discarded) if it failed."""
        self._stop(abort=False)
        if self.error is not None:
            self.writer.abort()
            return None
        try:
            for name, data in files.items():
                self.writer.put_file(name, data)
            return self.writer.finish(index_json)
        except BaseException as exc:
            self.writer.abort()
            log.warning("ssd cache commit failed key=%s: %s", self.writer.res.key, exc)
            return None

    def abort(self) -> None:
        """Stop the copy after the chunk in progress and discard the entry."""
        self._stop(abort=True)
        self.writer.abort()
