"""`sllm template list`, `sllm nodes`, `sllm env`, and the template scaffolding `fn new` uses.

Templates are folders under ``templates/`` of the source tree: each holds a function.yaml
(whose ``name:`` line is rewritten to the new function's name), usually a README.md whose
first line describes it, and whatever else the function needs. ``{{name}}`` in any text file
is replaced by the new name.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

from sllm.errors import Conflict, InvalidInput
from sllm.settings import ENVIRONMENT
from sllm.spec import validate_name
from sllm_cli.app import Groups, group
from sllm_cli.output import add_gateway_flags, gateway_client, print_table

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = REPO_ROOT / "templates"
_NAME_LINE = re.compile(r"^name:.*$", re.MULTILINE)
_MODEL_LINE = re.compile(r"^model:.*$", re.MULTILINE)


def template_names(root: Path = TEMPLATES_DIR) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "function.yaml").is_file())


def template_summary(path: Path) -> str:
    """The first sentence-line of the template's README (after its title)."""
    readme = path / "README.md"
    if not readme.is_file():
        return ""
    for line in readme.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def scaffold(
    name: str,
    template: str,
    parent: Path,
    model: str | None = None,
    root: Path = TEMPLATES_DIR,
) -> Path:
    """Copy template ``template`` to ``parent/name`` with the function named ``name``."""
    validate_name(name, "NAME")
    available = template_names(root)
    if template not in available:
        raise InvalidInput(
            f"template {template!r} does not exist (available: {', '.join(available) or 'none'}; "
            "see `sllm template list`)"
        )
    dst = parent / name
    if dst.exists():
        raise Conflict(f"{dst} already exists: choose another name or remove it")
    shutil.copytree(root / template, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in dst.rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = text.replace("{{name}}", name)
        if path == dst / "function.yaml":
            new = _NAME_LINE.sub(f"name: {name}", new, count=1)
            if model is not None:
                new = _MODEL_LINE.sub(f"model: {json.dumps(model)}", new, count=1)
        if new != text:
            path.write_text(new, encoding="utf-8")
    return dst


def cmd_template_list(args: argparse.Namespace) -> int:
    rows = [[name, template_summary(TEMPLATES_DIR / name)] for name in template_names()]
    if not rows:
        raise InvalidInput(f"no templates found in {TEMPLATES_DIR}")
    print_table(["TEMPLATE", "DESCRIPTION"], rows)
    return 0


def _node_row(node: dict[str, Any]) -> list[str]:
    devices = node.get("devices") or []
    instances = node.get("instances") or []
    cache = node.get("cache") or {}
    tiers = ", ".join(f"{tier}:{len(entries)}" for tier, entries in sorted(cache.items()))
    age = node.get("age_s")
    kinds = sorted({str(d.get("kind", "?")) for d in devices if isinstance(d, dict)})
    return [
        str(node.get("node_id") or node.get("id") or "?"),
        "yes" if node.get("live", True) else "no",
        f"{len(devices)} ({', '.join(kinds)})" if kinds else str(len(devices)),
        str(len(instances)),
        tiers or "-",
        f"{age:.1f}s" if isinstance(age, int | float) else "-",
    ]


def cmd_nodes(args: argparse.Namespace) -> int:
    with gateway_client(args) as client:
        nodes = client.nodes()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    if not nodes:
        print("no nodes have reported yet (is `sllm node start` running?)")
        return 0
    print_table(
        ["NODE", "LIVE", "DEVICES", "INSTANCES", "CACHED (tier:count)", "LAST SEEN"],
        [_node_row(n) for n in nodes],
    )
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    print_table(
        ["VARIABLE", "DEFAULT", "MEANING"],
        [[key, default or "-", help_text] for key, (default, help_text) in ENVIRONMENT.items()],
    )
    return 0


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    templates = group(root, groups, "template", "function templates for `sllm fn new`")
    p = templates.add_parser("list", help="list the templates")
    p.set_defaults(func=cmd_template_list)

    p = root.add_parser("nodes", help="list the runtime nodes and what they cache")
    add_gateway_flags(p)
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    p.set_defaults(func=cmd_nodes)

    p = root.add_parser("env", help="list the environment variables sllm reads")
    p.set_defaults(func=cmd_env)
