"""Random checkpoints written directly in the sllm format, for tests and the tier benchmark.

Only bytes matter to the cache tiers, so these skip the converter: partitions of random
float32 tensors (``tensor_bytes`` each, 4096-aligned) plus a config.json, with a valid index.
"""

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
    new_hasher,
    partition_name,
    write_index,
)

# 64 MiB: written and hashed in pieces this size, so a multi-GB checkpoint needs little RAM.
_WRITE_CHUNK = 64 << 20


def write_random_checkpoint(
    directory: Path,
    partition_bytes: tuple[int, ...] = (3 << 20, 1 << 20),
    seed: int = 0,
    tensor_bytes: int = 1 << 20,
) -> CheckpointIndex:
    """Write a checkpoint of random bytes; partitions are exactly ``partition_bytes`` long."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partitions: list[PartitionEntry] = []
    tensors: dict[str, TensorEntry] = {}
    for p, size in enumerate(partition_bytes):
        name = partition_name(p)
        hasher = new_hasher()
        with open(directory / name, "wb") as f:
            for off in range(0, size, _WRITE_CHUNK):
                n = min(_WRITE_CHUNK, size - off)
                data = rng.randbytes(n) if n < (8 << 20) else os.urandom(n)
                f.write(data)
                hasher.update(data)
        partitions.append(PartitionEntry(name, size, hasher.hexdigest()))
        offset, t = 0, 0
        while offset < size:
            n = min(tensor_bytes, size - offset) // 4 * 4
            if n == 0:
                break
            tensors[f"p{p}.t{t}"] = TensorEntry("float32", (n // 4,), p, offset, n)
            offset = align_up(offset + n, ALIGNMENT)
            t += 1
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    index = CheckpointIndex(partitions=tuple(partitions), tensors=tensors, files=("config.json",))
    write_index(directory, index)
    return index


def corrupt_byte(path: Path, at: int = 100) -> None:
    """Flip one byte in place (same size: only the checksum can tell)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
