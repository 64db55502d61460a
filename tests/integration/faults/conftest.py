"""One platform of real processes for the fault tests (issue 14), shared by the package:
nats-server, `sllm gateway start` and `sllm node start` (node ``a``), each killed and
restarted by pid by the tests (``tests.cluster.LocalCluster``). Every test starts from a
running platform (``up`` restarts what an earlier test left down) and two tiny checkpoints
in the store. Timing settings are short so faults show within seconds: heartbeats every
0.3 s, a node silent for 2 s is health-checked directly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import Checkpoint, LocalCluster


@dataclass
class Stage:
    cluster: LocalCluster
    tiny: Checkpoint
    other: Checkpoint  # another tiny model (other weights, same size)

    def up(self) -> LocalCluster:
        return self.cluster.restore()


@pytest.fixture(scope="package")
def stage(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stage]:
    from tests.tiny_model import build_tiny_llama

    root = tmp_path_factory.mktemp("faults")
    cluster = LocalCluster(
        root,
        env={
            "SLLM_HEARTBEAT_INTERVAL": "0.3s",
            "SLLM_NODE_TIMEOUT": "2s",
            "SLLM_WAKE_TIMEOUT": "120s",
            "SLLM_POLICY": "locality",
            "SLLM_SCALE_DOWN_WINDOW": "1s",
            "SLLM_CPU_SLOTS": "2",
            "SLLM_POOL_SIZE": "1",
            # The transformers backend: `backend: auto` would pick it for the tiny Llama
            # anyway (head size 16, for which vLLM's CPU attention has no kernel), so a vLLM
            # process would only cost each node its import. tests/integration/vllm covers
            # the vLLM backend, its cancel, drain and migration included.
            "SLLM_VLLM": "off",
            "SLLM_DRAM_CAPACITY": "256Mi",
            "SLLM_SSD_CAPACITY": "256Mi",
        },
    )
    tiny = cluster.checkpoint(tiny_model_dir, "checkpoints/tiny/faults")
    other_dir = build_tiny_llama(root / "other-hf", seed=7)
    other = cluster.checkpoint(other_dir, "checkpoints/other/faults")
    try:
        yield Stage(cluster, tiny, other)
    finally:
        cluster.stop()
