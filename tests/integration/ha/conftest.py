"""One platform of real processes for the HA tests (issue 16), shared by the package: NATS as a
cluster of three (routes authenticated, JetStream replicas 3), two gateways (``gw-0``,
``gw-1``) and one node (``a``), each killed and restarted by pid by the tests
(``tests.cluster.LocalCluster``). Every test starts from a running platform (``up`` restarts
what an earlier test left down) with no function deployed. Timing settings are short so
faults show within seconds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import Checkpoint, LocalCluster

GATEWAYS = ("gw-0", "gw-1")


@dataclass
class Stage:
    cluster: LocalCluster
    tiny: Checkpoint

    def up(self) -> LocalCluster:
        return self.cluster.restore(gateways=GATEWAYS)


@pytest.fixture(scope="package")
def stage(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stage]:
    root = tmp_path_factory.mktemp("ha")
    cluster = LocalCluster(
        root,
        nats_size=3,
        env={
            "SLLM_HEARTBEAT_INTERVAL": "0.3s",
            # no node is killed here: a long timeout keeps a node starved of CPU for a few
            # seconds (a loaded 2-core machine) from being given up
            "SLLM_NODE_TIMEOUT": "10s",
            "SLLM_WAKE_TIMEOUT": "120s",
            "SLLM_POLICY": "least-loaded",
            # long: a manual scale holds (no load would keep it) while its loads take their time
            "SLLM_SCALE_DOWN_WINDOW": "120s",
            "SLLM_CPU_SLOTS": "4",
            "SLLM_POOL_SIZE": "1",
            # The transformers backend: `backend: auto` would pick it for the tiny Llama
            # anyway (head size 16, for which vLLM's CPU attention has no kernel), so a vLLM
            # process would only cost each node its import. tests/integration/vllm covers
            # the vLLM backend, its cancel, drain and migration included.
            "SLLM_VLLM": "off",
            "SLLM_DRAM_CAPACITY": "256Mi",
            "SLLM_SSD_CAPACITY": "256Mi",
            "SLLM_SHUTDOWN_GRACE": "1s",
        },
    )
    tiny = cluster.checkpoint(tiny_model_dir, "checkpoints/tiny/ha")
    try:
        yield Stage(cluster, tiny)
    finally:
        cluster.stop()
