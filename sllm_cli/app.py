"""Assembles the `sllm` command line from the command modules and maps errors to exit codes.

Each module in ``COMMAND_MODULES`` has ``register(root, groups)``: ``root`` is the top-level
subparsers action, ``groups`` maps a group name ("ckpt", "fn", ...) to its subparsers action
(created on first use with ``group(root, groups, name, help)``). A command sets
``func(args) -> int`` with ``set_defaults``. Modules import torch and other heavy packages
inside their command functions only, so `sllm fn list` starts in a fraction of a second.

Errors: an ``SllmError`` prints one line ``sllm: error: <message>`` and exits 1; Ctrl-C exits
130; any other exception prints one line too (SLLM_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from sllm import __version__
from sllm.errors import SllmError
from sllm_cli.log_repeats import RepeatFilter

COMMAND_MODULES: tuple[str, ...] = (
    "sllm_cli.ckpt",
    "sllm_cli.fn",
    "sllm_cli.key",
    "sllm_cli.gateway",
    "sllm_cli.up",
    "sllm_cli.misc",
    "sllm_cli.nats",
    "sllm_cli.store",
    "sllm_cli.sim",
    "sllm_cli.node",
)

Groups = dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]


def group(
    root: argparse._SubParsersAction[argparse.ArgumentParser],
    groups: Groups,
    name: str,
    help_text: str,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The subparsers of command group ``name`` (e.g. `sllm ckpt ...`), created once."""
    if name not in groups:
        parser = root.add_parser(name, help=help_text, description=help_text)
        groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
        groups[name].required = True
    return groups[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sllm", description="Serverless functions for large language models."
    )
    parser.add_argument("--version", action="version", version=f"sllm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    root = parser.add_subparsers(dest="command", metavar="COMMAND")
    root.required = True
    groups: Groups = {}
    for name in COMMAND_MODULES:
        module: Any = importlib.import_module(name)
        module.register(root, groups)
    return parser


def run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # a fault repeating every loop turn costs one line per 10 s, not thousands (the handler is
    # only installed when the process has none yet: a test runner keeps its own)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(RepeatFilter())
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=[stderr],
    )
    try:
        code: int = args.func(args)
        return code
    except SllmError as exc:
        print(f"sllm: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:
        if os.environ.get("SLLM_DEBUG"):
            raise
        print(
            f"sllm: error: unexpected {type(exc).__name__}: {exc} (SLLM_DEBUG=1 shows the "
            "traceback)",
            file=sys.stderr,
        )
        return 1
