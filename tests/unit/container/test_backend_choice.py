"""Which instance backend a node builds from SLLM_INSTANCES (no engine is started here)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runtime.node.devices import Device
from runtime.node.instance_backend import ProcessBackend
from runtime.node.main import build_backend
from sllm.errors import ValidationFailed
from sllm.settings import NodeSettings

GPU = [Device("cuda:0", "cuda", 80 << 30)]
CPU = [Device("cpu:0", "cpu", 8 << 30)]


def settings(mode: str, tmp_path: Path) -> NodeSettings:
    return replace(NodeSettings.from_env({"SLLM_CACHE_DIR": str(tmp_path)}), instances=mode)


def test_process_mode_is_the_default_and_needs_no_engine(tmp_path: Path) -> None:
    backend = build_backend(NodeSettings.from_env({"SLLM_CACHE_DIR": str(tmp_path)}), CPU, tmp_path)
    assert isinstance(backend, ProcessBackend) and backend.kind == "process"


def test_gpu_nodes_keep_processes(tmp_path: Path) -> None:
    # GPUs are not passed into instance containers yet: auto falls back, container is refused
    assert build_backend(settings("auto", tmp_path), GPU, tmp_path).kind == "process"
    with pytest.raises(ValidationFailed, match=r"SLLM_INSTANCES=container: .*GPUs"):
        build_backend(settings("container", tmp_path), GPU, tmp_path)
