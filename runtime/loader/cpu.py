"""Checkpoint images in CPU memory and the tensors in them, as zero-copy views.

The image layout is ``runtime.ckpt.index.image_layout`` (partitions back to back at aligned
offsets), the one layout of the DRAM tier's shared memory, of a buffer the reader
(``runtime.loader.read``) fills and of a device image (``runtime.loader.cuda``), so
``tensor_views`` works on any of them. ``entry_tensors`` is the entry point for a DRAM entry:
what an instance builds its model from, and what another backend's loader takes its weights from.
"""

from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.ckpt.dtypes import torch_dtype
from runtime.ckpt.index import CheckpointIndex, checksum_bytes, image_layout, read_index
from sllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Linux 5.14+: fault the pages in from the kernel in one call (much cheaper than touching).
_MADV_POPULATE_WRITE = 23


def allocate_image(nbytes: int, *, touch: bool = True) -> torch.Tensor:
    """A writable uint8 tensor of ``nbytes`` on its own page-aligned anonymous mapping.

    ``touch`` pre-faults every page (MADV_POPULATE_WRITE): freshly mapped memory is slow to
    touch the first time on this VM (0.5-3.5 GB/s), so a buffer pool pays that once at start-up
    instead of during a load. The mapping is freed when the tensor is.
    """
    import torch

    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if touch:
        try:
            region.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            # Older kernels: touch one byte per page instead.
            for pos in range(0, nbytes, mmap.PAGESIZE):
                region[pos] = 0
    # frombuffer keeps a reference to ``region``: the mapping lives as long as the tensor.
    return torch.frombuffer(region, dtype=torch.uint8)


def image_from_buffer(buffer: Any) -> torch.Tensor:
    """A uint8 tensor over ``buffer`` (e.g. a read-only ``mmap`` of a shared-memory file),
    without copying. Read-only buffers are accepted silently: torch warns that writing to one
    is undefined, but images are never written once loaded."""
    import torch

    if len(memoryview(buffer)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=torch.uint8)


def image_size(index: CheckpointIndex) -> int:
    return image_layout(index)[1]


def writable_view(image: torch.Tensor) -> memoryview:
    """The bytes of a contiguous 1-d uint8 ``image`` as a writable view (for the reader)."""
    import torch

    if image.dtype != torch.uint8 or image.dim() != 1 or not image.is_contiguous():
        raise CheckpointError("image must be a contiguous 1-d uint8 tensor")
    view = memoryview(image.numpy().data).cast("B")
    if view.readonly:
        raise CheckpointError("image is read-only, cannot read into it")
    return view


def tensor_views(index: CheckpointIndex, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor (aliases included) as a zero-copy view of ``image``.

    Works on read-only buffer-backed images too: slicing and reinterpreting never copy or warn.
    """
    starts, size = image_layout(index)
    if image.numel() < size:
        raise CheckpointError(f"image holds {image.numel()} bytes, the checkpoint needs {size}")
    views: dict[str, torch.Tensor] = {}
    for name, t in index.tensors.items():
        begin = starts[t.partition] + t.offset
        raw = image[begin : begin + t.nbytes]
        views[name] = raw.view(torch_dtype(t.dtype)).view(t.shape)
    for alias, target in index.aliases.items():
        views[alias] = views[target]
    return views


def verify_image(index: CheckpointIndex, image: torch.Tensor) -> None:
    """Check each partition's bytes in ``image`` against its checksum (CheckpointError)."""
    starts, _ = image_layout(index)
    data = memoryview(image.numpy().data).cast("B")
    for start, p in zip(starts, index.partitions, strict=True):
        if checksum_bytes(data[start : start + p.nbytes]) != p.checksum:
            raise CheckpointError(f"{p.file}: checksum mismatch in the loaded image (corrupt)")


@dataclass
class EntryTensors:
    """A DRAM entry's tensors as read-only views of its mapped image; ``close`` unmaps it
    (after the last use of any view: a view outliving the mapping would read freed memory)."""

    index: CheckpointIndex
    mapping: mmap.mmap
    image: torch.Tensor
    tensors: dict[str, torch.Tensor]

    def close(self) -> None:
        self.tensors.clear()
        del self.image
        self.mapping.close()


def entry_tensors(entry: Path) -> EntryTensors:
    """The tensors of a DRAM entry (a ``runtime.cache.dram`` entry directory, or any
    checkpoint image file with its index beside it), as zero-copy views of its image mapped
    read-only: name -> tensor with the checkpoint's dtype and shape, aliases (tied weights)
    included, on CPU. No byte is copied or read until a view is used; writing through a view
    faults (the mapping is PROT_READ). Raises ``CheckpointError`` for a broken entry."""
    from runtime.cache.dram import map_image

    index = read_index(entry)
    mapping, image = map_image(entry, index)
    return EntryTensors(index, mapping, image, tensor_views(index, image))
