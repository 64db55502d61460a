"""DRAM images mapped ahead of need by a pre-started instance process.

Mapping a 2 GB image is instant but populating its page tables is not (~0.6-1 s here, or
~2-3 s of page faults in the first forward pass). An idle pool process is told which images
the node's DRAM tier holds (``premap`` lines) and maps and populates each one while it waits,
so a load of any of them starts from a ready mapping. The pages are shared with the DRAM tier
(no copy, no extra memory but page tables); an image the tier dropped is unmapped at the next
update, and all the others are unmapped once the process has loaded its model.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.ckpt.index import CheckpointIndex

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Linux 5.14+: populate page tables of a mapping for reading, without touching every page.
_MADV_POPULATE_READ = 22


@dataclass
class MappedImage:
    """A read-only mapping of a DRAM entry's image and the uint8 tensor over it."""

    entry: Path
    index: CheckpointIndex
    mapping: mmap.mmap
    image: torch.Tensor
    populated: bool

    def close(self) -> None:
        del self.image
        with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it later
            self.mapping.close()


def populate(mapping: mmap.mmap) -> bool:
    """Fault the whole mapping in with one madvise; False where the kernel cannot (< 5.14)."""
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError) as exc:
        log.info("madvise(MADV_POPULATE_READ) unavailable: %s", exc)
        return False
    return True


def map_entry(entry: Path, *, fill: bool) -> MappedImage:
    """Map ``entry``'s image (``runtime.cache.dram.map_image``), populated when ``fill``."""
    from runtime.cache.dram import map_image
    from runtime.ckpt.index import read_index

    index = read_index(entry)
    mapping, image = map_image(entry, index)
    return MappedImage(entry, index, mapping, image, fill and populate(mapping))


class Premapper:
    """The images an idle process keeps mapped, by entry directory."""

    def __init__(self) -> None:
        self.images: dict[str, MappedImage] = {}

    def update(self, entries: list[str]) -> None:
        """Map (and populate) the listed entries not mapped yet; unmap the ones not listed."""
        wanted = set(entries)
        for entry in [e for e in self.images if e not in wanted]:
            self.images.pop(entry).close()
        for entry in entries:
            if entry in self.images:
                continue
            started = time.monotonic()
            try:
                self.images[entry] = map_entry(Path(entry), fill=True)
            except Exception as exc:  # evicted meanwhile, or broken: the load maps it itself
                log.info("premap of %s skipped: %s", entry, exc)
                continue
            log.info("premapped %s in %.3fs", entry, time.monotonic() - started)

    def take(self, entry: str) -> MappedImage | None:
        """The mapping of ``entry`` (handed over), after unmapping every other one."""
        found = self.images.pop(entry, None)
        for other in self.images.values():
            other.close()
        self.images.clear()
        return found
