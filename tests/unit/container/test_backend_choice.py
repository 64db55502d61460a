"""Which instance backend a node builds from SLLM_INSTANCES (no engine is started here)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runtime.backend.choice import ModelFacts, choose_backend
from runtime.container.backend import ContainerBackend
from runtime.container.podman import Podman
from runtime.node.devices import Device
from runtime.node.instance_backend import ProcessBackend
from runtime.node.main import build_backend
from sllm.errors import Unavailable, ValidationFailed
from sllm.settings import NodeSettings
from sllm.spec import FunctionRecord

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


RECORD = FunctionRecord.from_dict(
    {
        "spec": {"name": "f", "model": "m", "backend": "vllm"},
        "checkpoint": "c",
        "checkpoint_bytes": 1,
    }
)


async def test_container_instances_refuse_vllm_naming_why(tmp_path: Path) -> None:
    # the runtime image has no vLLM: `backend: vllm` fails its load with this reason, and
    # auto falls back to transformers naming it (the supervisor passes it to choose_backend)
    backend = ContainerBackend(Podman("podman"), "img", "n1", tmp_path, tmp_path / "dram", 0, {})
    with pytest.raises(Unavailable, match="the runtime image has no vLLM") as refused:
        await backend.vllm_support()
    with pytest.raises(Unavailable, match="the runtime image has no vLLM"):
        await backend.take(RECORD, "vllm")
    facts = ModelFacts(architectures=("LlamaForCausalLM",), head_dim=64)
    fallback = choose_backend("auto", facts, None, on_cpu=True, vllm_missing=refused.value.message)
    assert fallback.backend == "transformers"
    assert "do not run in containers yet" in fallback.reason


async def test_a_process_node_without_vllm_says_why() -> None:
    backend = ProcessBackend(0, {}, 0, "the vLLM backend is off on this node (SLLM_VLLM=off)")
    assert backend.vllm_pool is None
    with pytest.raises(Unavailable, match="SLLM_VLLM=off"):
        await backend.vllm_support()
    with pytest.raises(Unavailable, match="SLLM_VLLM=off"):
        await backend.take(RECORD, "vllm")
