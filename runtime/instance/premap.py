"""DRAM images mapped ahead of need by a pre-started instance process.

Mapping a 2 GB image is instant but populating its page tables is not (~0.6-1 s here, or
~2-3 s of page faults in the first forward pass). An idle pool process is told which images
the node's DRAM tier holds (``premap`` lines) and maps and populates each one while it waits,
so a load of any of them starts from a ready mapping (and with the checkpoint's tokenizer
loaded: ``MappedImage.tokenizer``). The pages are shared with the DRAM tier
(no copy, no extra memory but page tables); an image the tier dropped is unmapped at the next
update, and all the others are unmapped once the process has loaded its model.

A mapping is of a file, not of a path: the DRAM tier recycles an evicted image's file as a
free slab for the next entry, and an entry fetched again gets a new file at the same path. So
each mapping remembers the file it maps (device and inode) and is used only while that file
is still the entry's image; otherwise it would hand over another checkpoint's bytes (or
SIGBUS, when the slab is shorter now).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.ckpt.index import CheckpointIndex
from sllm.errors import CheckpointError

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
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the image file mapped
    # the entry's tokenizer, loaded by the idle process (``Premapper``); None: the load does it
    tokenizer: Any = None
    # the entry's transformers model on CPU, its weights views of ``image``, built by an idle
    # transformers process (``Premapper(build_models=True)``); None: the load builds it
    model: Any = None
    # vLLM's own tokenizer of the entry, in vLLM's tokenizer cache, loaded by an idle vLLM
    # process (``Premapper(engine_tokenizers=True)``); None: an engine build loads it
    engine_tokenizer: Any = None

    def current(self) -> bool:
        """Whether the entry's image is still the file this maps (see the module doc)."""
        return self.file_id is not None and _file_id(self.entry) == self.file_id

    def close(self) -> None:
        self.model = None  # its weights are views of the mapping
        self.engine_tokenizer = None
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


def _file_id(entry: Path) -> tuple[int, int] | None:
    from runtime.cache.dram import IMAGE_FILE

    try:
        st = os.stat(entry / IMAGE_FILE)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def map_entry(entry: Path, *, fill: bool) -> MappedImage:
    """Map ``entry``'s image (``runtime.cache.dram.map_image``), populated when ``fill``."""
    from runtime.cache.dram import map_image
    from runtime.ckpt.index import read_index

    before = _file_id(entry)
    index = read_index(entry)
    mapping, image = map_image(entry, index)
    mapped = MappedImage(entry, index, mapping, image, False, before)
    if before is None or not mapped.current():
        mapped.close()
        raise CheckpointError(f"{entry}: the image was replaced while it was being mapped")
    mapped.populated = fill and populate(mapping)
    return mapped


def _ahead(what: str, entry: Path, make: Callable[[], Any]) -> Any:
    """``make()``, what an idle process prepares for ``entry``, or None where it fails (the
    load then makes it itself and reports why)."""
    try:
        return make()
    except Exception as exc:
        log.info("%s of %s not prepared ahead: %s", what, entry, exc)
        return None


def _tokenizer(entry: Path) -> Any:
    """The entry's tokenizer, or None where it has none or it does not load. transformers'
    ``AutoTokenizer`` took 0.38-0.52 s for SmolLM2's (a 3.5 MB tokenizer.json, parsed twice
    and deep-copied) on this VM, most of a warm vLLM engine's cold start; loaded here it
    costs the idle process ~10 MB."""
    from runtime.loader.model import TOKENIZER_FILES, load_tokenizer

    if not any((entry / name).is_file() for name in TOKENIZER_FILES):
        return None
    return _ahead("tokenizer", entry, lambda: load_tokenizer(entry))


def _cpu_model(mapped: MappedImage) -> Any:
    """The entry's model on CPU over views of the mapping (``runtime.loader.model.build_model``),
    or None where the entry has no model config or the model does not build (the load then
    tries again and reports why). Measured on the 2.15 GB float32 bench model: 10-20 ms of a
    18 ms load from DRAM; the model costs the idle process its Python objects and rotary
    buffers, as its weights are the DRAM tier's pages."""
    from runtime.loader.cpu import tensor_views
    from runtime.loader.model import build_model

    if not (mapped.entry / "config.json").is_file():
        return None
    return _ahead(
        "model",
        mapped.entry,
        lambda: build_model(mapped.entry, tensor_views(mapped.index, mapped.image)),
    )


def _engine_tokenizer(entry: Path) -> Any:
    """vLLM's tokenizer of ``entry``, cached for the next engine build
    (``runtime.backend.vllm_build.preload_engine_tokenizer``), or None where it does not load."""
    from runtime.backend.vllm_build import preload_engine_tokenizer

    if not (entry / "config.json").is_file():
        return None
    return _ahead("vLLM tokenizer", entry, lambda: preload_engine_tokenizer(entry))


class Premapper:
    """The images an idle process keeps mapped, by entry directory, each with its
    checkpoint's tokenizer loaded and, with ``build_models`` (a transformers process), its
    model built on CPU over the mapping, or, with ``engine_tokenizers`` (a vLLM process),
    vLLM's tokenizer in vLLM's cache."""

    def __init__(self, *, build_models: bool = False, engine_tokenizers: bool = False) -> None:
        self.images: dict[str, MappedImage] = {}
        self.build_models = build_models
        self.engine_tokenizers = engine_tokenizers

    def update(self, entries: list[str]) -> None:
        """Map (and populate) the listed entries not mapped yet; unmap the ones not listed."""
        wanted = set(entries)
        dropped = [e for e, m in self.images.items() if e not in wanted or not m.current()]
        for entry in dropped:
            self.images.pop(entry).close()
        if self.engine_tokenizers and dropped:
            # vLLM's cache cannot drop one entry: empty it and load the kept entries' again
            from runtime.backend.vllm_build import forget_engine_tokenizers

            forget_engine_tokenizers()
            for entry, mapped in self.images.items():
                mapped.engine_tokenizer = _engine_tokenizer(Path(entry))
        for entry in entries:
            if entry in self.images:
                continue
            started = time.monotonic()
            try:
                self.images[entry] = map_entry(Path(entry), fill=True)
            except Exception as exc:  # evicted meanwhile, or broken: the load maps it itself
                log.info("premap of %s skipped: %s", entry, exc)
                continue
            mapped = self.images[entry]
            mapped.tokenizer = _tokenizer(Path(entry))
            if self.build_models and mapped.populated:
                mapped.model = _cpu_model(mapped)
            if self.engine_tokenizers:
                mapped.engine_tokenizer = _engine_tokenizer(Path(entry))
            log.info("premapped %s in %.3fs", entry, time.monotonic() - started)

    def take(self, entry: str) -> MappedImage | None:
        """The mapping of ``entry`` (handed over) if it still maps the entry's image, after
        unmapping every other one."""
        found = self.images.pop(entry, None)
        for other in self.images.values():
            other.close()
        self.images.clear()
        if found is not None and not found.current():
            log.info("premapped %s is stale (the image was recycled): mapping it anew", entry)
            found.close()
            return None
        return found
