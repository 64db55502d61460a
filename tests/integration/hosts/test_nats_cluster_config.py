"""The NATS cluster as compose runs it (docker/compose.yaml): three nats-servers on three hosts,
each started with ``--name nats-<i> -c cluster.conf`` from the one ``cluster.conf`` that
`sllm nats creds --routes` wrote (routes with their password, the NKey authorization
included). They form a cluster, JetStream replicates a bucket on all three, and the platform's
identities connect; a client without credentials is refused."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm.errors import Unavailable
from sllm.nats_bus import NatsBus
from sllm_cli import netns
from sllm_cli.main import main
from sllm_cli.servers import find_binary, nats_healthy, stop_process
from tests.integration.hosts.conftest import MakeTopology

pytestmark = pytest.mark.integration

NAMES = ["nats-0", "nats-1", "nats-2"]


@pytest.fixture(scope="module")
def members(
    make_topology: MakeTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[str], Path]]:
    root = tmp_path_factory.mktemp("compose-nats")
    topo = make_topology(NAMES, netns.LinkShape())
    hosts = [topo[name] for name in NAMES]
    secrets = root / "secrets"
    routes = ",".join(f"nats://{h.address}:6222" for h in hosts)
    assert main(["nats", "creds", str(secrets), "--node", "node-0", "--routes", routes]) == 0
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, host in enumerate(hosts):
            log = open(root / f"{NAMES[i]}.log", "wb")  # noqa: SIM115 - closed with the process
            cmd = [
                *host.wrap, find_binary("nats-server"),
                "-js", "-sd", str(root / NAMES[i]), "-m", "8222", "--name", NAMES[i],
                "-c", str(secrets / "cluster.conf"),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + 60
        for i, host in enumerate(hosts):
            while not nats_healthy(host.address, 8222):
                log_text = (root / f"{NAMES[i]}.log").read_text(errors="replace")
                assert procs[i].poll() is None, log_text
                assert time.monotonic() < deadline, log_text
                time.sleep(0.1)
        yield [f"nats://{h.address}:4222" for h in hosts], secrets
    finally:
        for proc in procs:
            stop_process(proc)


def test_the_compose_form_makes_an_authenticated_cluster(
    members: tuple[list[str], Path],
) -> None:
    urls, secrets = members

    async def check() -> None:
        bus = await NatsBus.connect(urls, "compose-gw", seed_file=secrets / "gateway.nk")
        try:
            kv = await bus.key_value("compose_check", replicas=3)
            await kv.put("k", b"v")
            info = await bus.nc.jetstream().stream_info("KV_compose_check")
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            assert await kv.get("k") == b"v"
        finally:
            await bus.close()
        with pytest.raises(Unavailable, match="refused the credentials"):
            await NatsBus.connect(urls, "anonymous", connect_timeout_s=2.0)

    asyncio.run(check())
