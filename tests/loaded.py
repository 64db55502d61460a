"""Checkpoints brought into memory the way a node does, for tests of what comes after.

``read_into_memory`` runs the one reader (``runtime.loader.read``) into a fresh image;
``dram_entry`` makes a real DRAM-tier entry (``DramCache.writer``, filled by the same reader,
as the node's SSD -> DRAM hop does), whose tensors ``runtime.loader.cpu.entry_tensors`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.ckpt.index import INDEX_FILE, CheckpointIndex, image_layout, read_index
from runtime.loader.cpu import allocate_image, tensor_views, writable_view
from runtime.loader.read import ReadStats, read_checkpoint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class InMemory:
    index: CheckpointIndex
    image: torch.Tensor
    tensors: dict[str, torch.Tensor]
    stats: ReadStats


def read_into_memory(directory: Path, *, threads: int = 4) -> InMemory:
    index = read_index(directory)
    image = allocate_image(image_layout(index)[1], touch=False)
    stats = read_checkpoint(directory, index, writable_view(image), threads=threads)
    return InMemory(index, image, tensor_views(index, image), stats)


def dram_entry(checkpoint_dir: Path, root: Path, key: str = "ckpt") -> Path:
    """``checkpoint_dir`` as a committed entry of a DRAM tier rooted at ``root``."""
    from runtime.cache.dram import DramCache

    index = read_index(checkpoint_dir)
    index_json = (checkpoint_dir / INDEX_FILE).read_bytes()
    files = {name: (checkpoint_dir / name).read_bytes() for name in index.files}
    extra = len(index_json) + sum(len(d) for d in files.values())
    cache = DramCache(root, image_layout(index)[1] + extra + (1 << 20))
    writer = cache.writer(key, index, extra, populate=False)
    try:
        read_checkpoint(checkpoint_dir, index, writer.buffer)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(index_json, files)
