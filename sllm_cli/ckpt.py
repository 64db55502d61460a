"""`sllm ckpt convert|inspect|verify`: the checkpoint format from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sllm.errors import InvalidInput, ValidationFailed
from sllm.spec import parse_memory

Groups = dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    from sllm_cli.app import group

    ckpt = group(root, groups, "ckpt", "convert, inspect and verify sllm checkpoints")
    p = ckpt.add_parser(
        "convert",
        help="convert a Hugging Face directory or a GGUF file into the sllm format",
        description="Convert SRC (a Hugging Face directory with safetensors or "
        "pytorch_model*.bin, or a .gguf file) into a new sllm checkpoint directory DST.",
    )
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    p.add_argument(
        "--partition-size", default="1Gi", help="bytes per partition file (default: 1Gi)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="cast floating-point tensors of .bin/GGUF sources (GGUF default: float32)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=cmd_convert)

    p = ckpt.add_parser("inspect", help="list a checkpoint's tensors and totals")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=cmd_inspect)

    p = ckpt.add_parser("verify", help="check every partition's checksum")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_verify)


def cmd_convert(args: argparse.Namespace) -> int:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.ckpt.index import DTYPE_SIZES

    try:
        partition_bytes = parse_memory(args.partition_size, "--partition-size")
    except ValidationFailed as exc:
        raise InvalidInput(exc.message) from None
    if partition_bytes < 4096:
        raise InvalidInput(f"--partition-size: must be at least 4096 bytes, got {partition_bytes}")
    if args.dtype is not None and args.dtype not in DTYPE_SIZES:
        raise InvalidInput(f"--dtype: unknown dtype {args.dtype!r} (e.g. bfloat16, float32)")
    show = sys.stderr.isatty() and not args.no_progress
    with _progress_bar(show, f"converting {args.src.name}") as progress:
        index = convert_checkpoint(
            args.src,
            args.dst,
            partition_bytes=partition_bytes,
            progress=progress,
            dtype=args.dtype,
        )
    print(
        f"{args.dst}: {len(index.tensors)} tensors, {_size(index.total_bytes)} in "
        f"{len(index.partitions)} partition(s), {len(index.files)} extra file(s)"
    )
    return 0


@contextmanager
def _progress_bar(show: bool, desc: str) -> Iterator[Callable[[int, int], None] | None]:
    if not show:
        yield None
        return
    from tqdm import tqdm

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def cmd_inspect(args: argparse.Namespace) -> int:
    from runtime.ckpt.index import read_index

    index = read_index(args.directory)
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "partition": index.partitions[t.partition].file,
        }
        for name, t in index.tensors.items()
    ]
    totals = {
        "tensors": len(index.tensors),
        "aliases": len(index.aliases),
        "tensor_bytes": sum(t.nbytes for t in index.tensors.values()),
        "partition_bytes": index.total_bytes,
        "partitions": len(index.partitions),
    }
    if args.json:
        payload = {
            "tensors": rows,
            "aliases": index.aliases,
            "partitions": [p.to_json() for p in index.partitions],
            "files": list(index.files),
            "totals": totals,
            "digest": index.digest(),
        }
        print(json.dumps(payload, indent=1))
        return 0
    table = [
        [r["name"], r["dtype"], _shape(r["shape"]), str(r["bytes"]), r["partition"]] for r in rows
    ]
    table += [
        [alias, "(alias)", "", "0", f"-> {target}"] for alias, target in index.aliases.items()
    ]
    header = ["NAME", "DTYPE", "SHAPE", "BYTES", "PARTITION"]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(
        f"total: {totals['tensors']} tensors ({totals['aliases']} aliases), "
        f"{_size(totals['tensor_bytes'])} of tensors, {_size(totals['partition_bytes'])} in "
        f"{totals['partitions']} partition(s); files: {', '.join(index.files) or '-'}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from runtime.ckpt.verify import verify_checkpoint

    index = verify_checkpoint(args.directory)
    print(
        f"{args.directory}: ok ({len(index.partitions)} partition(s), "
        f"{_size(index.total_bytes)}, checksums match)"
    )
    return 0


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
