"""The house in layers (docs/architecture.md): sllm/ holds the shared contracts and imports
none of the floors built on it, and says in a line what each public definition is for."""

from __future__ import annotations

import ast
from pathlib import Path

SLLM = Path(__file__).resolve().parents[3] / "sllm"
ABOVE = ("gateway", "runtime", "sllm_cli", "sllm_sim")


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(SLLM.rglob("*.py"))]


def _imported(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):  # walk: imports inside functions count too
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_sllm_imports_nothing_built_on_it() -> None:
    upward = [
        f"{path.relative_to(SLLM.parent)} imports {name}"
        for path, tree in _modules()
        for name in _imported(tree)
        if name.split(".")[0] in ABOVE
    ]
    assert upward == []


def _undocumented(body: list[ast.stmt], where: str) -> list[str]:
    missing: list[str] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            if ast.get_docstring(node) is None:
                missing.append(f"{where}:{node.lineno} {node.name}")
            if isinstance(node, ast.ClassDef):
                missing.extend(_undocumented(node.body, where))
    return missing


def test_every_public_definition_in_sllm_has_a_docstring() -> None:
    missing = [
        name
        for path, tree in _modules()
        for name in _undocumented(tree.body, str(path.relative_to(SLLM.parent)))
    ]
    assert missing == []
