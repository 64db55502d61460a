"""A NATS cluster of three for this folder's modules (each module its own: 0.4 s to start), run
as the platform runs it: only known identities (NKeys) may connect, and routes need the
cluster's password (sllm.nats_auth)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sllm.nats_auth import NatsCredentials
from sllm_cli.servers import NatsCluster, nats_members, start_nats_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    root = tmp_path_factory.mktemp("cluster")
    creds = NatsCredentials(root / "creds")
    creds.gateway()
    cluster = start_nats_cluster(nats_members(root, 3), credentials=creds)
    yield cluster
    cluster.stop()
