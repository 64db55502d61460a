"""Write small sllm checkpoints directly (index + partitions), independent of the converter."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from runtime.ckpt.index import (
    ALIGNMENT,
    CheckpointIndex,
    PartitionEntry,
    TensorEntry,
    align_up,
    checksum_bytes,
    partition_name,
    write_index,
)


def make_checkpoint(
    directory: Path, partition_bytes: tuple[int, ...] = (3 << 20, 1 << 20), seed: int = 0
) -> CheckpointIndex:
    """Partitions of random float32 tensors (1 MiB each, last one smaller) plus config.json."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    partitions: list[PartitionEntry] = []
    tensors: dict[str, TensorEntry] = {}
    for p, size in enumerate(partition_bytes):
        data = bytearray(rng.randbytes(size))
        offset = 0
        t = 0
        while offset < size:
            n = min(1 << 20, size - offset) // 4 * 4
            if n == 0:
                break
            tensors[f"p{p}.t{t}"] = TensorEntry("float32", (n // 4,), p, offset, n)
            offset = align_up(offset + n, ALIGNMENT)
            t += 1
        name = partition_name(p)
        (directory / name).write_bytes(data)
        partitions.append(PartitionEntry(name, size, checksum_bytes(bytes(data))))
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    index = CheckpointIndex(partitions=tuple(partitions), tensors=tensors, files=("config.json",))
    write_index(directory, index)
    return index


def corrupt(path: Path, at: int = 100) -> None:
    """Flip one byte in place (same size: only the checksum can tell)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
