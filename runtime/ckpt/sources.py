"""Readers for what ``convert_checkpoint`` accepts: the tensors and extra files of a source.

A source is a Hugging Face directory (single or sharded safetensors, or ``pytorch_model*.bin``),
one such weights file, or a GGUF file. Every reader checks that a file is what its extension
says (safetensors header, torch archive, GGUF magic) and raises ``CheckpointError`` naming the
file otherwise. Safetensors are copied byte for byte from file ranges (no torch tensors, any
dtype the format defines); torch and GGUF sources go through torch tensors, where tensors
sharing storage (tied weights) become aliases.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.ckpt.dtypes import SAFETENSORS_DTYPES, dtype_name
from runtime.ckpt.index import DTYPE_SIZES, INDEX_FILE, validate_tensor_name
from sllm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# 16 MiB: large enough that per-call overhead vanishes, small enough to stay in cache.
COPY_CHUNK = 16 << 20
# A safetensors header over 100 MB is garbage (the format's own reader refuses those too).
MAX_HEADER = 100 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
GGUF_MAGIC = b"GGUF"


@dataclass
class SourceTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterator[memoryview]]


@dataclass
class Source:
    kind: str  # "safetensors" | "pytorch" | "gguf"
    tensors: list[SourceTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)
    # Writes generated extra files (GGUF: config, tokenizer) into a directory; returns names.
    write_extras: Callable[[Path], list[str]] | None = None


def open_source(src: Path, *, dtype: str | None = None) -> Source:
    """Read the tensor list of ``src`` (metadata only for safetensors). ``dtype`` casts the
    floating-point tensors of torch and GGUF sources (GGUF default: float32)."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".gguf":
            return _gguf_source(src, dtype or "float32")
        if suffix == ".safetensors":
            return _safetensors_source([src])
        if suffix in (".bin", ".pt", ".pth"):
            return _torch_source([src], dtype)
        raise CheckpointError(
            f"{src}: unsupported source (expected a Hugging Face directory, .safetensors, "
            ".bin or .gguf)"
        )
    if (src / INDEX_FILE).is_file():
        raise CheckpointError(f"{src}: already an sllm checkpoint (it has {INDEX_FILE})")
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    safetensors = _shards(src, "model.safetensors.index.json") or [
        p for p in files if p.suffix == ".safetensors"
    ]
    bins = _shards(src, "pytorch_model.bin.index.json") or [
        p for p in files if p.name.startswith("pytorch_model") and p.suffix == ".bin"
    ]
    ggufs = [p for p in files if p.suffix == ".gguf"]
    if safetensors:
        source = _safetensors_source(safetensors)
    elif bins:
        source = _torch_source(bins, dtype)
    elif len(ggufs) == 1:
        return _gguf_source(ggufs[0], dtype or "float32")
    else:
        raise CheckpointError(
            f"{src}: no weights found (expected *.safetensors, pytorch_model*.bin or one .gguf)"
        )
    source.extra_files = {
        p.name: p
        for p in files
        if not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.endswith((".safetensors.index.json", ".bin.index.json"))
        and p.name != INDEX_FILE
    }
    return source


def _shards(src: Path, index_name: str) -> list[Path]:
    """The weight files a sharded checkpoint's index lists (empty when there is no index)."""
    path = src / index_name
    if not path.is_file():
        return []
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
        for f in weight_map.values()
    ):
        raise CheckpointError(f"{path}: garbled shard index (expected a 'weight_map' object)")
    shards = [src / f for f in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in {index_name} is missing")
    return shards


# ---- safetensors: parse the header ourselves, copy byte ranges -------------------------------


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file, validated against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} invalid)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    return 8 + n, header


def _safetensors_source(paths: list[Path]) -> Source:
    tensors: list[SourceTensor] = []
    seen: set[str] = set()
    for path in paths:
        start, header = read_safetensors_header(path)
        data_size = path.stat().st_size - start
        entries: list[tuple[int, SourceTensor]] = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            validate_tensor_name(name, str(path))
            if name in seen:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one file")
            seen.add(name)
            entries.append(_safetensors_entry(path, start, data_size, name, info))
        tensors.extend(t for _, t in sorted(entries, key=lambda e: e[0]))
    return Source("safetensors", tensors)


def _safetensors_entry(
    path: Path, start: int, data_size: int, name: str, info: object
) -> tuple[int, SourceTensor]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
    dtype = SAFETENSORS_DTYPES[str(code)]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = DTYPE_SIZES[dtype]
    for d in shape:
        nbytes *= d
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} data_offsets {offsets} do not fit its shape {shape} "
            f"of {dtype} or lie outside the file (truncated?)"
        )

    def chunks() -> Iterator[memoryview]:
        with open(path, "rb", buffering=0) as f:
            pos, stop = start + begin, start + end
            while pos < stop:
                data = os.pread(f.fileno(), min(COPY_CHUNK, stop - pos), pos)
                if not data:
                    raise CheckpointError(f"{path}: file ended early (truncated while reading)")
                pos += len(data)
                yield memoryview(data)

    return begin, SourceTensor(name, dtype, tuple(shape), nbytes, chunks)


# ---- torch archives and GGUF: through torch tensors ---------------------------------------


def _torch_load(path: Path) -> dict[str, Any]:
    import pickle
    import zipfile

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # mmap needs the zip format; the legacy pickle format is read into memory.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: PyTorch checkpoint is not a dict of tensors")
    return state


def _torch_source(paths: list[Path], dtype: str | None) -> Source:
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, value in _torch_load(path).items():
            validate_tensor_name(name, str(path))
            if not _is_tensor(value):
                raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
            if name in state:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one file")
            state[name] = value
    return tensors_source("pytorch", state, str(paths[0]), dtype)


def _is_tensor(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def tensors_source(
    kind: str, state: dict[str, torch.Tensor], where: str, dtype: str | None
) -> Source:
    """A source over in-memory tensors; tensors viewing the same bytes become aliases."""
    import torch

    from runtime.ckpt.dtypes import torch_dtype

    cast = torch_dtype(dtype) if dtype else None
    tensors: list[SourceTensor] = []
    aliases: dict[str, str] = {}
    owners: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() and key in owners:
            aliases[name] = owners[key]
            continue
        owners[key] = name
        if cast is not None and t.is_floating_point() and t.dtype != cast:
            t = t.to(cast)
        name_of_dtype = dtype_name(t.dtype)
        if name_of_dtype is None:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        tensors.append(
            SourceTensor(name, name_of_dtype, tuple(t.shape), nbytes, _tensor_chunks(t, torch))
        )
    return Source(kind, tensors, aliases)


def _tensor_chunks(t: torch.Tensor, torch: Any) -> Callable[[], Iterator[memoryview]]:
    def chunks() -> Iterator[memoryview]:
        if t.numel() == 0:
            return
        # reshape(-1) of a contiguous copy: 0-d tensors and non-contiguous sources both work.
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        yield memoryview(flat.numpy().data)

    return chunks


def _gguf_source(path: Path, dtype: str) -> Source:
    """Dequantize a GGUF file through transformers' GGUF reader into ``dtype`` tensors."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    import torch

    from runtime.ckpt.dtypes import torch_dtype

    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        config.dtype = dtype
        # The meta model only maps GGUF tensor names to transformers names (no memory).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        state = load_gguf_checkpoint(  # type: ignore[no-untyped-call]
            str(path), return_tensors=True, model_to_load=model, torch_dtype=torch_dtype(dtype)
        )["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read GGUF file ({exc})") from None
    state = {
        name: t.to(torch_dtype(dtype)) if t.is_floating_point() else t for name, t in state.items()
    }

    def write_extras(dst: Path) -> list[str]:
        before = set(os.listdir(dst))
        # the class the tensors were mapped for: vLLM (and AutoModel) pick the model by it
        config.architectures = config.architectures or [type(model).__name__]
        config.save_pretrained(dst)
        tokenizer.save_pretrained(dst)
        GenerationConfig.from_model_config(config).save_pretrained(dst)
        return sorted(set(os.listdir(dst)) - before)

    source = tensors_source("gguf", state, str(path), dtype)
    # Tied weights the GGUF file stores once (output = token embedding): alias them so that
    # both names load.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, origin in tied.items():
        if target not in state and origin in state:
            source.aliases[target] = origin
    source.write_extras = write_extras
    return source
