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

from sllm_cli.servers import NatsCluster
from tests.cluster import LocalCluster

GATEWAYS = ("gw-0", "gw-1")


@dataclass(frozen=True)
class Checkpoint:
    key: str
    nbytes: int


@dataclass
class Stage:
    cluster: LocalCluster
    tiny: Checkpoint

    def up(self) -> LocalCluster:
        c = self.cluster
        if c.nats is None:
            c.start_nats()
        assert isinstance(c.nats, NatsCluster)
        for i, server in enumerate(c.nats.servers):
            if not server.alive():
                c.nats.restart(i)
        for name in GATEWAYS:
            if name not in c.gateways or not c.gateways[name].alive():
                c.start_gateway(name)
        if "a" not in c.nodes or not c.nodes["a"].alive():
            c.start_node("a")
        c.leader()  # one of them decides before a test begins
        c.clear()  # and the node is empty: each test has its slots
        return c


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
            "SLLM_DRAM_CAPACITY": "256Mi",
            "SLLM_SSD_CAPACITY": "256Mi",
            "SLLM_SHUTDOWN_GRACE": "1s",
        },
    )
    key = "checkpoints/tiny/ha"
    tiny = Checkpoint(key, cluster.add_checkpoint(tiny_model_dir, key))
    try:
        yield Stage(cluster, tiny)
    finally:
        cluster.stop()
        import shutil

        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        for node_id in cluster.nodes:
            env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(root / "cache" / node_id)}
            shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
