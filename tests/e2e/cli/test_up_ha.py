"""`sllm up --ha`: NATS as a cluster of three with the registry on all three, and a member that
dies is started again while the platform keeps serving."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sllm.nats_bus import NatsBus
from sllm_cli.servers import free_port
from tests.e2e.cli.conftest import Up, user_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Path]]:
    root = tmp_path_factory.mktemp("ha")
    (root / "home").mkdir()
    up = Up(user_env(root / "home", root / "sllm-home"), free_port())
    up.start("--ha")
    yield up, root / "sllm-home"
    code = up.stop()
    assert code == 0, up.text()[-3000:]


def _members(sllm_home: Path) -> dict[str, tuple[int, str]]:
    """name -> (pid, client URL) of the running nats-servers of this home."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        config = next((c for c in cmd if c.startswith(str(sllm_home / "nats-cluster"))), None)
        if config is None:
            continue
        text = Path(config).read_text()
        name = re.search(r'server_name: "([^"]+)"', text)
        listen = re.search(r'listen: "([^"]+)"', text)
        assert name and listen
        found[name.group(1)] = (proc.pid, f"nats://{listen.group(1)}")
    return found


async def _replicas(urls: list[str], seed_file: Path) -> int:
    bus = await NatsBus.connect(urls, "ha-test", seed_file=seed_file)
    try:
        info = await bus.nc.jetstream().stream_info("KV_sllm-functions")
        return int(info.config.num_replicas)
    finally:
        await bus.close()


def test_up_ha_runs_a_nats_cluster_and_restarts_a_dead_member(ha: tuple[Up, Path]) -> None:
    up, sllm_home = ha
    members = _members(sllm_home)
    assert sorted(members) == ["nats-0", "nats-1", "nats-2"]
    urls = [url for _, url in members.values()]
    # the cluster takes only the identities `sllm up` made (the gateway's here), and its
    # members' routes authenticate with the route password beside them
    creds = sllm_home / "secrets" / "nats"
    assert asyncio.run(_replicas(urls, creds / "gateway.nk")) == 3
    assert (creds / "route.secret").is_file()
    token = (sllm_home / "token").read_text().strip()
    auth = {"authorization": f"Bearer {token}"}

    victim_pid, _ = members["nats-1"]
    os.kill(victim_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now = _members(sllm_home)
        if "nats-1" in now and now["nats-1"][0] != victim_pid:
            break
        assert time.monotonic() < deadline, "nats-1 was not started again:\n" + up.text()[-2000:]
        # The gateway answers all along (it is given all three servers).
        assert httpx.get(f"{up.url}/system/functions", headers=auth, timeout=10).status_code == 200
        time.sleep(0.2)
    assert up.process is not None and up.process.poll() is None
    assert "nats-1 exited" in up.text() or "starting it again" in up.text()
    assert httpx.get(f"{up.url}/healthz", timeout=10).json()["nodes"] >= 1
