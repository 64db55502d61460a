"""An idle vLLM process imports what a build would (``_import_ahead``): a module that cannot be
imported there is left to the build, and the process comes up anyway."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from runtime.backend.vllm_process import _import_ahead


def test_a_module_that_fails_is_left_to_the_build_and_the_others_are_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "sllm_ahead_ok.py").write_text("VALUE = 1\n")
    (tmp_path / "sllm_ahead_raises.py").write_text("raise RuntimeError('no device here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sllm_ahead_ok", "sllm_ahead_raises"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with caplog.at_level(logging.INFO, logger="runtime.backend.vllm_process"):
        _import_ahead(["sllm_ahead_raises", "sllm_ahead_missing_module", "sllm_ahead_ok"])
    assert "sllm_ahead_ok" in sys.modules
    assert "sllm_ahead_raises" not in sys.modules
    logged = caplog.text
    assert "sllm_ahead_raises not imported ahead of a build: no device here" in logged
    assert "sllm_ahead_missing_module not imported ahead of a build" in logged
