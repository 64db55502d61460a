"""Fixtures of the CLI unit tests: an isolated HOME/SLLM_HOME and a CLI runner that builds
only this area's command modules (so the tests do not depend on other areas' commands)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sllm_cli import app

CLI_MODULES = ("sllm_cli.fn", "sllm_cli.up", "sllm_cli.misc")

RunCli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, SLLM_HOME and no gateway variables: nothing of the developer's machine leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SLLM_HOME", str(tmp_path / "sllm-home"))
    for key in ("XDG_CONFIG_HOME", "SLLM_GATEWAY_URL", "SLLM_TOKEN", "SLLM_STORE_URL"):
        monkeypatch.delenv(key, raising=False)
    return home


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], isolated_env: Path
) -> RunCli:
    monkeypatch.setattr(app, "COMMAND_MODULES", CLI_MODULES)

    def run(*argv: str) -> tuple[int, str, str]:
        code = app.run(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
