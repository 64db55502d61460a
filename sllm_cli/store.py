"""`sllm ckpt push DIR URL`: upload a converted checkpoint to the model store.

URL is where the checkpoint lands: ``s3://bucket/checkpoints/chat/v1`` (endpoint, region and
credentials from SLLM_S3_* / AWS_* variables) or a local directory. The directory is verified
first; index.json goes up last, so an interrupted push is never taken for a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

Groups = dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    from sllm_cli.app import group

    ckpt = group(root, groups, "ckpt", "convert, inspect and verify sllm checkpoints")
    p = ckpt.add_parser(
        "push",
        help="upload a converted checkpoint to the model store (S3 or a directory)",
        description="Verify the sllm checkpoint DIR and upload it to URL (s3://bucket/prefix "
        "or a local directory): multipart, parallel, index.json last.",
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("url", metavar="URL")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="parallel uploads (default SLLM_S3_CONCURRENCY)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from runtime.ckpt.index import read_index
    from runtime.store import open_store
    from runtime.store.push import checkpoint_bytes, push_checkpoint
    from sllm.errors import InvalidInput
    from sllm.settings import StoreSettings

    directory: Path = args.directory
    if not directory.is_dir():
        raise InvalidInput(f"DIR {directory}: not a directory (expected an sllm checkpoint)")
    url: str = args.url
    if not url or url.startswith(("http://", "https://")):
        raise InvalidInput(f"URL {url!r}: expected s3://bucket/prefix or a local directory")
    if args.concurrency is not None and not 1 <= args.concurrency <= 64:
        raise InvalidInput(f"--concurrency {args.concurrency}: must be in [1, 64]")
    settings = dataclasses.replace(StoreSettings.from_env(), url=url)
    if args.concurrency is not None:
        settings = dataclasses.replace(settings, concurrency=args.concurrency)
    store = open_store(settings)
    total = checkpoint_bytes(directory, read_index(directory))
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="push",
        disable=True if args.no_progress else None,
        file=sys.stderr,
    ) as bar:

        def progress(n: int) -> None:
            bar.update(n)

        index = push_checkpoint(directory, store, "", progress=progress)
    print(f"pushed {directory} -> {store.url} ({total} bytes, digest {index.digest()})")
    return 0
