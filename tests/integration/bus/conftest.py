"""A NATS cluster of three for this folder's modules (each module its own: 0.4 s to start)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sllm.servers import NatsCluster, nats_members, start_nats_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = start_nats_cluster(nats_members(tmp_path_factory.mktemp("cluster"), 3))
    yield cluster
    cluster.stop()
