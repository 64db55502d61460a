"""`sllm fn new` and `sllm template list`: the shipped templates scaffold valid functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.errors import Conflict, InvalidInput, ValidationFailed
from sllm.spec import parse_spec_yaml
from sllm_cli.misc import TEMPLATES_DIR, scaffold, template_names

from .conftest import RunCli

REQUIRED = {"llm-chat", "llm-completion", "python-handler"}


def test_required_templates_ship_with_their_files() -> None:
    assert set(template_names()) >= REQUIRED
    for name in REQUIRED:
        folder = TEMPLATES_DIR / name
        for f in ("function.yaml", "requirements.txt", "Dockerfile", "README.md"):
            assert (folder / f).is_file(), f"{name}/{f}"
    assert (TEMPLATES_DIR / "python-handler" / "handler.py").is_file()


@pytest.mark.parametrize("template", sorted(REQUIRED))
def test_scaffold_names_the_function_and_parses(tmp_path: Path, template: str) -> None:
    dst = scaffold("team-bot-2", template, tmp_path, model="../weights dir/m.gguf")
    spec = parse_spec_yaml((dst / "function.yaml").read_text())
    assert spec.name == "team-bot-2"
    assert spec.model == "../weights dir/m.gguf"
    assert "{{name}}" not in (dst / "README.md").read_text()
    assert "team-bot-2" in (dst / "README.md").read_text()


def test_python_handler_template_declares_hooks(tmp_path: Path) -> None:
    dst = scaffold("hooks", "python-handler", tmp_path)
    spec = parse_spec_yaml((dst / "function.yaml").read_text())
    assert spec.handler == "handler:handle"
    source = (dst / "handler.py").read_text()
    assert "def load(model: Any, tokenizer: Any, env: dict[str, str])" in source
    assert "def handle(request: dict[str, Any], ctx: Any)" in source


@pytest.mark.parametrize("name", ["Bad_Name", "-x", "a" * 64, "has space"])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationFailed, match="DNS-1123"):
        scaffold(name, "llm-chat", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_template_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist") as info:
        scaffold("ok", "no-such-template", tmp_path)
    assert "llm-chat" in info.value.message


def test_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(Conflict, match="already exists"):
        scaffold("taken", "llm-chat", tmp_path)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_new_and_template_list(run_cli: RunCli, tmp_path: Path) -> None:
    code, out, _ = run_cli("template", "list")
    assert code == 0
    for name in REQUIRED:
        assert name in out
    code, out, _ = run_cli(
        "fn", "new", "hello", "--template", "llm-completion", "--dir", str(tmp_path)
    )
    assert code == 0 and "created" in out
    assert parse_spec_yaml((tmp_path / "hello" / "function.yaml").read_text()).handler == (
        "completion"
    )


def test_cli_bad_input_is_one_line_and_exit_1(run_cli: RunCli, tmp_path: Path) -> None:
    code, out, err = run_cli("fn", "new", "Bad_Name", "--dir", str(tmp_path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sllm: error: NAME: 'Bad_Name'")
    code, _, err = run_cli("fn", "new", "ok", "--template", "nope", "--dir", str(tmp_path))
    assert code == 1 and "template 'nope' does not exist" in err and "Traceback" not in err
