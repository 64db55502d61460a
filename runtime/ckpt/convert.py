"""Convert a Hugging Face directory or GGUF file into the sllm checkpoint format.

``convert_checkpoint(src, dst)`` lays tensors out at 4096-aligned offsets in partitions of about
``partition_bytes`` (in ``serving_order``: the parts an engine fuses into one parameter side by
side), streams their bytes into ``data-NNNNN.bin`` while hashing them (xxh3_64)
and checking that every floating-point value is finite (``finite.FiniteCheck``: NaN weights
are refused, naming the tensor),
copies the non-tensor files (config, tokenizer, chat template, generation config) and writes
``index.json`` last. Everything goes into a hidden temporary directory beside ``dst`` that is
renamed to ``dst`` only when complete: an interrupted conversion leaves at most a
``.<name>.tmp-*`` directory without an index, never something that looks like a checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from runtime.ckpt.finite import FiniteCheck
from runtime.ckpt.index import (
    ALIGNMENT,
    INDEX_FILE,
    CheckpointIndex,
    PartitionEntry,
    TensorEntry,
    align_up,
    new_hasher,
    partition_name,
    write_index,
)
from runtime.ckpt.sources import Source, SourceTensor, open_source
from sllm import __version__
from sllm.errors import CheckpointError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
_ZEROS = bytes(ALIGNMENT)
# The modules vLLM's Llama-family models fuse into one (QKVParallelLinear,
# MergedColumnParallelLinear), by fused name: their parts concatenated along the output
# dimension in this order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def split_name(name: str) -> tuple[str, str, str]:
    """``(layer, module, leaf)`` of a tensor name:
    ``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn``, ``q_proj``,
    ``weight``."""
    path, _, leaf = name.rpartition(".")
    layer, _, module = path.rpartition(".")
    return layer, module, leaf


def serving_order(tensors: list[SourceTensor]) -> list[SourceTensor]:
    """The source order, except that the parts of one fused parameter (a layer's q/k/v
    projections, its gate/up projections; weight and bias apart) follow each other in the
    order of ``FUSED_PARTS``, at the place of the first of them.

    A row-major ``[out, in]`` matrix concatenated along ``out`` is its parts' bytes back to
    back, so with the parts adjacent in the image (and 4096-byte multiples, as large matrices
    are) the fused parameter is one zero-copy view of it (``runtime.backend.vllm_loader``).
    Safetensors files usually list ``k_proj, o_proj, q_proj, v_proj``."""

    def key(position: int, name: str) -> tuple[int, int]:
        layer, part, leaf = split_name(name)
        for group in FUSED_PARTS.values():
            if part in group:
                return first.setdefault((layer, group, leaf), position), group.index(part)
        return position, 0

    first: dict[tuple[str, tuple[str, ...], str], int] = {}
    keys = [key(i, t.name) for i, t in enumerate(tensors)]
    return [t for _, t in sorted(zip(keys, tensors, strict=True), key=lambda kt: kt[0])]


def plan_layout(
    tensors: list[SourceTensor], partition_bytes: int
) -> tuple[dict[str, TensorEntry], list[int]]:
    """Assign each tensor a partition and an aligned offset, in the order given.

    A partition is closed when the next tensor would push it past ``partition_bytes``; a tensor
    larger than that gets a partition of its own. Returns the entries and each partition's
    size (padded to ``ALIGNMENT`` so O_DIRECT can read whole files).
    """
    if partition_bytes < ALIGNMENT:
        raise CheckpointError(f"partition size {partition_bytes} is below {ALIGNMENT} bytes")
    entries: dict[str, TensorEntry] = {}
    sizes: list[int] = [0]
    for t in tensors:
        offset = align_up(sizes[-1])
        if offset and offset + t.nbytes > partition_bytes:
            sizes.append(0)
            offset = 0
        entries[t.name] = TensorEntry(t.dtype, t.shape, len(sizes) - 1, offset, t.nbytes)
        sizes[-1] = offset + t.nbytes
    return entries, [align_up(s) for s in sizes]


def convert_checkpoint(
    src: Path,
    dst: Path,
    *,
    partition_bytes: int = 1 << 30,
    progress: Progress | None = None,
    dtype: str | None = None,
) -> CheckpointIndex:
    """Convert ``src`` into a new sllm checkpoint directory ``dst`` and return its index.

    ``dtype`` casts floating-point tensors of torch and GGUF sources (GGUF dequantizes to
    float32 by default); safetensors are copied as they are. ``progress(done, total)`` is
    called with tensor bytes written so far. ``dst`` must not exist.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists (remove it or choose another destination)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    source = open_source(src, dtype=dtype)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index = _write_checkpoint(source, tmp, partition_bytes, progress, str(src))
        try:
            os.rename(tmp, dst)
        except OSError as exc:
            # another process created dst meanwhile (ENOTEMPTY/EEXIST)
            raise CheckpointError(f"{dst}: cannot move the conversion into place ({exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "converted %s -> %s: %d tensors, %d bytes, %d partitions",
        src,
        dst,
        len(index.tensors),
        index.total_bytes,
        len(index.partitions),
    )
    return index


def _write_checkpoint(
    source: Source, tmp: Path, partition_bytes: int, progress: Progress | None, where: str
) -> CheckpointIndex:
    ordered = serving_order(source.tensors)
    entries, sizes = plan_layout(ordered, partition_bytes)
    total = sum(t.nbytes for t in ordered)
    done = 0
    if progress:
        progress(0, total)
    by_partition: list[list[SourceTensor]] = [[] for _ in sizes]
    for t in ordered:
        by_partition[entries[t.name].partition].append(t)
    partitions: list[PartitionEntry] = []
    for i, tensors in enumerate(by_partition):
        name = partition_name(i)
        with open(tmp / name, "wb") as f:
            writer = _PartitionWriter(f)
            for t in tensors:
                writer.pad(entries[t.name].offset - writer.pos)
                written = 0
                finite = FiniteCheck(t.name, t.dtype)
                for chunk in t.chunks():
                    finite.feed(chunk)
                    writer.put(chunk)
                    written += len(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                if written != t.nbytes:
                    raise CheckpointError(
                        f"{where}: tensor {t.name!r} gave {written} bytes, expected {t.nbytes}"
                    )
                finite.done(where)
            writer.pad(sizes[i] - writer.pos)
            f.flush()
            os.fsync(f.fileno())
        partitions.append(PartitionEntry(name, sizes[i], writer.hasher.hexdigest()))

    files: list[str] = []
    for fname, path in sorted(source.extra_files.items()):
        shutil.copyfile(path, tmp / fname)
        files.append(fname)
    if source.write_extras is not None:
        files.extend(source.write_extras(tmp))
    files = sorted(set(files) - {INDEX_FILE})
    index = CheckpointIndex(
        partitions=tuple(partitions),
        tensors=entries,
        aliases=dict(source.aliases),
        files=tuple(files),
        metadata={
            "source_format": source.kind,
            "source_name": Path(where).name,
            "converted_by": f"sllm {__version__}",
        },
    )
    write_index(tmp, index)
    _fsync_dir(tmp)
    return index


class _PartitionWriter:
    """Writes a partition file while hashing it and tracking the position."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hasher = new_hasher()
        self.pos = 0

    def put(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.hasher.update(data)
        self.pos += len(data)

    def pad(self, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROS))
            self.put(_ZEROS[:k])
            n -= k


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
