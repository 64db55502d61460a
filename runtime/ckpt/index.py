"""The sllm checkpoint index: what a checkpoint directory holds and where each tensor lies.

A checkpoint directory is::

    index.json          this index (format, version, partitions, tensors, aliases, files)
    data-00000.bin ...  partition files of raw tensor bytes, every tensor at a 4096-aligned offset
    config.json, tokenizer.json, ...   non-tensor files copied verbatim

``read_index`` validates everything that can be checked without reading tensor bytes and
raises ``CheckpointError`` naming the file and the problem; ``check_partition_sizes`` checks
the partition files against the index (a truncated partition is caught before any read).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from sllm.errors import CheckpointError

FORMAT = "sllm-ckpt"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
# 4096: O_DIRECT needs block-aligned offsets and lengths, and page-aligned tensors can be
# zero-copy views of a page-aligned buffer.
ALIGNMENT = 4096
CHECKSUM_ALGO = "xxh3_64"
_PARTITION_RE = re.compile(r"^data-\d{5}\.bin$")

# dtype name -> bytes per element. Names are torch's (torch.float8_e4m3fn -> "float8_e4m3fn").
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
}


def partition_name(i: int) -> str:
    return f"data-{i:05d}.bin"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def validate_tensor_name(name: object, where: str) -> str:
    """Tensor names become attribute paths and may be printed or used as keys in caches:
    refuse anything that looks like a file path (absolute, '/..', backslashes, NUL)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: tensor name must be a non-empty string, got {name!r}")
    if name.startswith("/") or "/" in name or "\\" in name or "\x00" in name or ".." in name:
        raise CheckpointError(f"{where}: tensor name {name!r} contains a path separator or '..'")
    return name


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "partition": self.partition,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class PartitionEntry:
    file: str
    nbytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "nbytes": self.nbytes, "checksum": self.checksum}


@dataclass(frozen=True)
class CheckpointIndex:
    partitions: tuple[PartitionEntry, ...]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    alignment: int = ALIGNMENT
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Bytes of all partition files (what a loader reads)."""
        return sum(p.nbytes for p in self.partitions)

    def digest(self) -> str:
        """A content id: stable across copies, changes with any partition's bytes."""
        h = xxhash.xxh3_64()
        for p in self.partitions:
            h.update(f"{p.file}:{p.nbytes}:{p.checksum};".encode())
        h.update(json.dumps(sorted(self.tensors)).encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "alignment": self.alignment,
            "total_bytes": self.total_bytes,
            "checksum_algo": CHECKSUM_ALGO,
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "aliases": dict(self.aliases),
            "files": list(self.files),
            "metadata": self.metadata,
        }


def write_index(directory: Path, index: CheckpointIndex) -> None:
    """Write index.json atomically (temp file + fsync + rename)."""
    path = directory / INDEX_FILE
    tmp = directory / f".{INDEX_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index.to_json(), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(directory: Path) -> CheckpointIndex:
    path = Path(directory) / INDEX_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected an sllm checkpoint)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not an sllm checkpoint directory)") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: garbled index, not valid JSON ({exc})") from None
    return parse_index(data, str(path))


def parse_index(data: object, where: str) -> CheckpointIndex:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: garbled index, expected a JSON object")
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: unsupported format version {version!r} (this build reads {FORMAT_VERSION})"
        )
    alignment = data.get("alignment", ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % ALIGNMENT:
        raise CheckpointError(f"{where}: alignment {alignment!r} is not a multiple of {ALIGNMENT}")
    algo = data.get("checksum_algo", CHECKSUM_ALGO)
    if algo != CHECKSUM_ALGO:
        raise CheckpointError(f"{where}: unknown checksum algorithm {algo!r}")

    raw_parts = data.get("partitions")
    if not isinstance(raw_parts, list):
        raise CheckpointError(f"{where}: 'partitions' must be a list")
    partitions: list[PartitionEntry] = []
    for i, p in enumerate(raw_parts):
        if not isinstance(p, dict):
            raise CheckpointError(f"{where}: partitions[{i}] is not an object")
        file, nbytes, checksum = p.get("file"), p.get("nbytes"), p.get("checksum")
        if not isinstance(file, str) or not _PARTITION_RE.match(file):
            raise CheckpointError(f"{where}: partitions[{i}] has an invalid file name {file!r}")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise CheckpointError(
                f"{where}: partitions[{i}] ({file}) has invalid nbytes {nbytes!r}"
            )
        if not isinstance(checksum, str) or not re.fullmatch(r"[0-9a-f]{16}", checksum):
            raise CheckpointError(f"{where}: partitions[{i}] ({file}) has an invalid checksum")
        partitions.append(PartitionEntry(file, nbytes, checksum))

    raw_tensors = data.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise CheckpointError(f"{where}: 'tensors' must be an object")
    tensors: dict[str, TensorEntry] = {}
    for name, t in raw_tensors.items():
        validate_tensor_name(name, where)
        tensors[name] = _parse_tensor(name, t, partitions, alignment, where)

    raw_aliases = data.get("aliases", {})
    if not isinstance(raw_aliases, dict):
        raise CheckpointError(f"{where}: 'aliases' must be an object")
    aliases: dict[str, str] = {}
    for alias, target in raw_aliases.items():
        validate_tensor_name(alias, where)
        if target not in tensors:
            raise CheckpointError(f"{where}: alias {alias!r} points to unknown tensor {target!r}")
        aliases[alias] = target

    raw_files = data.get("files", [])
    if not isinstance(raw_files, list) or not all(isinstance(f, str) for f in raw_files):
        raise CheckpointError(f"{where}: 'files' must be a list of names")
    for f in raw_files:
        if "/" in f or "\\" in f or f.startswith(".") or f == INDEX_FILE:
            raise CheckpointError(f"{where}: extra file name {f!r} is not a plain file name")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: 'metadata' must be an object")
    return CheckpointIndex(
        partitions=tuple(partitions),
        tensors=tensors,
        aliases=aliases,
        files=tuple(raw_files),
        metadata=metadata,
        alignment=alignment,
        version=FORMAT_VERSION,
    )


def _parse_tensor(
    name: str, t: object, partitions: list[PartitionEntry], alignment: int, where: str
) -> TensorEntry:
    if not isinstance(t, dict):
        raise CheckpointError(f"{where}: tensor {name!r} is not an object")
    dtype, shape = t.get("dtype"), t.get("shape")
    part, offset, nbytes = t.get("partition"), t.get("offset"), t.get("nbytes")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    for key, value in (("partition", part), ("offset", offset), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{where}: tensor {name!r} has invalid {key} {value!r}")
    assert isinstance(part, int) and isinstance(offset, int) and isinstance(nbytes, int)
    if part >= len(partitions):
        raise CheckpointError(f"{where}: tensor {name!r} points to missing partition {part}")
    expected = math.prod(shape) * DTYPE_SIZES[str(dtype)]
    if nbytes != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r} has nbytes {nbytes} but shape {shape} of {dtype} "
            f"needs {expected}"
        )
    if offset % alignment:
        raise CheckpointError(
            f"{where}: tensor {name!r} offset {offset} is not {alignment}-aligned"
        )
    if offset + nbytes > partitions[part].nbytes:
        raise CheckpointError(
            f"{where}: tensor {name!r} ends at byte {offset + nbytes}, past the end of "
            f"{partitions[part].file} ({partitions[part].nbytes} bytes)"
        )
    return TensorEntry(str(dtype), tuple(shape), part, offset, nbytes)


def check_partition_sizes(directory: Path, index: CheckpointIndex) -> None:
    """Every partition file exists with the size the index records (catches truncation)."""
    for p in index.partitions:
        path = Path(directory) / p.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: partition file is missing") from None
        if size != p.nbytes:
            raise CheckpointError(
                f"{path}: partition is {size} bytes, the index says {p.nbytes} (truncated or "
                "overwritten)"
            )


def new_hasher() -> Any:
    """Streaming hasher for partition checksums (xxh3_64: ~10+ GB/s, far above disk speed)."""
    return xxhash.xxh3_64()


def checksum_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def image_layout(index: CheckpointIndex) -> tuple[list[int], int]:
    """Where each partition starts in a checkpoint *image*, and the image's size.

    An image is all partitions back to back, each at an ``ALIGNMENT``-aligned offset: the one
    layout shared by the CPU loader's buffer, the DRAM cache's shared-memory region and the
    views an instance builds, so a tensor's bytes are at ``starts[partition] + offset``.
    """
    starts: list[int] = []
    pos = 0
    for p in index.partitions:
        starts.append(pos)
        pos = align_up(pos + p.nbytes, index.alignment)
    return starts, pos
