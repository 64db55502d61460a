"""Issue 16, done when #4: a node on its own host is killed, and its function is placed on the
other node, whose host pulls the checkpoint from the store over its shaped link.

Hosts (network namespaces, ``sllm_cli.netns``): ``store`` (SeaweedFS S3, 1gbit), ``node-a`` and
``node-b`` (a node each, 40mbit = 5 MB/s). NATS (a cluster of three) and two gateways run in
this namespace, on the bridge's address. The host of node ``a`` dies: the node and its
instance processes are SIGKILLed. Requests sent meanwhile wait and are served by node ``b``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from sllm_cli import netns
from sllm_cli.servers import ManagedServer, start_seaweedfs
from tests.chaos import clients_on
from tests.cluster import AUTH, LocalCluster
from tests.integration.hosts.conftest import MakeTopology
from tests.integration.hosts.test_node_on_a_host import ALPHA, S3_ENV, SEED_BW, _make_bucket

pytestmark = pytest.mark.integration

RATE = "40mbit"
KEY = "checkpoints/tiny/node-killed"


@dataclass
class World:
    cluster: LocalCluster
    nbytes: int
    topo: netns.Topology


@pytest.fixture(scope="module")
def platform(
    make_topology: MakeTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    from runtime.store import open_store
    from runtime.store.push import push_checkpoint
    from sllm.settings import StoreSettings
    from tests.tiny_model import TinyConfig, build_tiny_llama

    root = tmp_path_factory.mktemp("node-killed")
    shaped = netns.LinkShape(RATE)
    topo = make_topology(
        ["store", "node-a", "node-b"],
        {"store": netns.LinkShape("1gbit"), "node-a": shaped, "node-b": shaped},
    )
    store = topo["store"]
    s3: ManagedServer | None = None
    cluster: LocalCluster | None = None
    try:
        s3 = start_seaweedfs(
            root / "s3", 8333, host=store.address, wrap=store.wrap, env={**os.environ, **S3_ENV}
        )
        store_env = {
            "SLLM_S3_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"],
            "SLLM_S3_SECRET_ACCESS_KEY": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "SLLM_STORE_URL": "s3://models/sllm",
            "SLLM_S3_ENDPOINT": f"http://{store.address}:8333",
        }
        _make_bucket(store_env, "models")
        # ~17 MB: 3.4 s at 5 MB/s, well apart from an unshaped pull (~0.1 s here)
        config = TinyConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
        hf = build_tiny_llama(root / "hf", seed=3, config=config)
        from runtime.ckpt.convert import convert_checkpoint

        index = convert_checkpoint(hf, root / "ckpt")
        push_checkpoint(root / "ckpt", open_store(StoreSettings.from_env(store_env)), KEY)
        cluster = LocalCluster(
            root,
            nats_size=3,
            nats_host=topo.address,
            env={
                **store_env,
                "SLLM_HEARTBEAT_INTERVAL": "0.3s",
                "SLLM_NODE_TIMEOUT": "2s",
                "SLLM_WAKE_TIMEOUT": "120s",
                "SLLM_POLICY": "locality",
                "SLLM_CPU_SLOTS": "1",
                "SLLM_POOL_SIZE": "1",
                # the transformers backend only: no vLLM process (links and placement are what is
                # tested here; tests/integration/faults runs its faults on the vLLM backend)
                "SLLM_VLLM": "off",
                "SLLM_STORE_BANDWIDTH": str(int(SEED_BW)),
            },
        )
        cluster.start_nats()
        cluster.start_gateway("gw-0")
        cluster.start_gateway("gw-1")
        yield World(cluster, index.total_bytes, topo)
    finally:
        if cluster is not None:
            cluster.stop()
            import shutil

            from runtime.node.main import dram_root
            from sllm.settings import NodeSettings

            for node_id in cluster.nodes:
                env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(root / "cache" / node_id)}
                shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
        if s3 is not None:
            s3.stop()


async def store_bandwidth(admin: httpx.AsyncClient, node_id: str) -> float:
    nodes = {n["node_id"]: n for n in (await admin.get("/system/nodes")).json()}
    return float(nodes[node_id]["bandwidths"]["store"])


async def until_placed_on(admin: httpx.AsyncClient, function: str, node_id: str) -> None:
    """Until ``function``'s only ready instance is on ``node_id``."""
    deadline = time.monotonic() + 120
    while True:
        described = (await admin.get(f"/system/functions/{function}")).json()
        ready = [i["node"] for i in described["instances"] if i["state"] == "ready"]
        if ready == [node_id]:
            return
        assert time.monotonic() < deadline, f"{function} never came up on node {node_id} alone"
        await asyncio.sleep(0.2)


async def test_a_dead_hosts_function_moves_to_the_other_node_over_its_link(
    platform: World,
) -> None:
    cluster, nbytes, topo = platform.cluster, platform.nbytes, platform.topo
    await asyncio.to_thread(cluster.start_node, "a", host=topo["node-a"])
    cluster.deploy("nk", KEY, nbytes, min=1, max=1, keep_alive="10m")
    async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=10) as admin:
        await until_placed_on(admin, "nk", "a")
        await asyncio.to_thread(cluster.start_node, "b", host=topo["node-b"])
        assert await store_bandwidth(admin, "b") == SEED_BW  # b has pulled nothing yet
        async with clients_on(cluster.url, "nk", to=cluster.urls, count=2) as tally:
            await tally.until("ok", 4)
            # the host dies: its instance processes and its node, all at once
            for pid in cluster.instance_pids("a"):
                os.kill(pid, signal.SIGKILL)
            cluster.kill_node("a")
            killed = time.monotonic()
            await until_placed_on(admin, "nk", "b")
            moved_s = time.monotonic() - killed
            await tally.until("ok", 4, since=time.monotonic())
        bandwidth = await store_bandwidth(admin, "b")
        metrics = (await admin.get("/metrics")).text
    assert tally.wrong() == [], tally.wrong()
    counts = tally.counts()
    assert counts["ok"] == len(tally.outcomes), (counts, tally.errors())
    # b pulled the checkpoint from the store over its 40mbit link: its learned store
    # bandwidth took the observation in (runtime.cache.bandwidth: an EWMA, ALPHA new)
    rate = netns.rate_bytes_per_s(RATE)
    observed = (bandwidth - (1 - ALPHA) * SEED_BW) / ALPHA
    assert 0.6 * rate < observed <= 1.05 * rate, (observed, rate)
    assert moved_s >= nbytes / rate * 0.95  # no faster than the link allows
    assert 'sllm_cold_starts_total{function="nk",tier="store"} 2.0' in metrics
