"""What the gateway-facing commands share: the --url/--token flags, the client they build,
and plain-text tables and sizes for the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from sllm_cli.client import ClientConfig, GatewayClient


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help="gateway URL (default: $SLLM_GATEWAY_URL, ~/.config/sllm/config.yaml)"
    )
    parser.add_argument(
        "--token", help="bearer token (default: $SLLM_TOKEN, ~/.config/sllm/config.yaml)"
    )


def gateway_client(args: argparse.Namespace, timeout_s: float = 30.0) -> GatewayClient:
    config = ClientConfig.resolve(url=args.url, token=args.token, key=getattr(args, "key", None))
    return GatewayClient(config, timeout_s=timeout_s)


def print_table(headers: list[str], rows: list[list[str]], out: TextIO | None = None) -> None:
    """Left-aligned columns two spaces apart, like kubectl."""
    out = out or sys.stdout
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
