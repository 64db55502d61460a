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

from tests.cluster import LocalCluster


@dataclass(frozen=True)
class Checkpoint:
    key: str
    nbytes: int


@dataclass
class Stage:
    cluster: LocalCluster
    tiny: Checkpoint
    other: Checkpoint  # another tiny model (other weights, same size)

    def up(self) -> LocalCluster:
        c = self.cluster
        if c.nats is None or not c.nats.alive():
            c.start_nats()
        if c.gateway is None or not c.gateway.alive():
            c.start_gateway()
        if "a" not in c.nodes or not c.nodes["a"].alive():
            c.start_node("a")
        # the earlier tests' functions go, and the node is empty: each test has its slots (their
        # idle instances held both, and a test's first cold start waited for capacity)
        c.clear()
        return c


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
            "SLLM_DRAM_CAPACITY": "256Mi",
            "SLLM_SSD_CAPACITY": "256Mi",
        },
    )
    tiny = Checkpoint(
        "checkpoints/tiny/faults", cluster.add_checkpoint(tiny_model_dir, "checkpoints/tiny/faults")
    )
    other_dir = build_tiny_llama(root / "other-hf", seed=7)
    other = Checkpoint(
        "checkpoints/other/faults", cluster.add_checkpoint(other_dir, "checkpoints/other/faults")
    )
    try:
        yield Stage(cluster, tiny, other)
    finally:
        cluster.stop()
        import shutil

        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        for node_id in cluster.nodes:
            env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(root / "cache" / node_id)}
            shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
