"""A node on its own host (a network namespace) pulls a checkpoint from the store on another
host over a link shaped by tc: the pull runs at the link's rate, not at loopback speed, and the
instance it starts answers on the host's address.

Hosts: ``store`` (SeaweedFS S3, 1gbit), ``nats`` (nats-server, unshaped), ``node-a`` (the node,
40mbit = 5 MB/s). The test process talks to all three over the bridge."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sllm.bus import Message
from sllm.instance_auth import auth_header
from sllm.messages import (
    EVENTS,
    HEARTBEATS,
    CmdReply,
    InstanceEvent,
    LoadCmd,
    NodeHeartbeat,
    UnloadCmd,
    decode_as,
    encode,
    node_cmd_subject,
)
from sllm.nats_auth import NatsCredentials
from sllm.nats_bus import NatsBus
from sllm.spec import FunctionRecord, FunctionSpec
from sllm_cli import netns
from sllm_cli.servers import (
    ManagedServer,
    nats_client_env,
    start_nats,
    start_seaweedfs,
    stop_process,
)
from tests.integration.hosts.conftest import MakeTopology

pytestmark = pytest.mark.integration

NODE_RATE = "40mbit"
SEED_BW = 1e9  # the node's store bandwidth before it measures a pull (SLLM_STORE_BANDWIDTH)
ALPHA = 0.3  # runtime.cache.bandwidth.ALPHA: the share of a new observation in the average
KEY = "checkpoints/tiny/hosts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "hosts-test", "AWS_SECRET_ACCESS_KEY": "hosts-secret"}


@dataclass
class World:
    topo: netns.Topology
    # the gateway role's SLLM_NATS_URL and SLLM_NATS_SEED_FILE: the test acts as the gateway
    gateway_env: dict[str, str]
    checkpoint_bytes: int
    node: subprocess.Popen[bytes]
    node_log: Path


@pytest.fixture(scope="module")
def world(make_topology: MakeTopology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store import open_store
    from runtime.store.push import push_checkpoint
    from sllm.settings import StoreSettings
    from tests.tiny_model import TinyConfig, build_tiny_llama

    root = tmp_path_factory.mktemp("hosts")
    topo = make_topology(
        ["store", "nats", "node-a"],
        {"store": netns.LinkShape("1gbit"), "node-a": netns.LinkShape(NODE_RATE)},
    )
    servers: list[ManagedServer] = []
    node: subprocess.Popen[bytes] | None = None
    try:
        store, nats_host, node_host = topo["store"], topo["nats"], topo["node-a"]
        s3 = start_seaweedfs(
            root / "s3",
            8333,
            host=store.address,
            wrap=store.wrap,
            env={**os.environ, **S3_ENV},
        )
        servers.append(s3)
        nats = start_nats(
            root / "nats",
            4222,
            credentials=NatsCredentials(root / "nats-creds"),
            host=nats_host.address,
            wrap=nats_host.wrap,
        )
        servers.append(nats)
        # ~17 MB: 3.4 s at 5 MB/s, well apart from an unshaped pull (~0.1 s here)
        config = TinyConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
        hf = build_tiny_llama(root / "hf", seed=1, config=config)
        index = convert_checkpoint(hf, root / "ckpt")
        store_env = {
            "SLLM_S3_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"],
            "SLLM_S3_SECRET_ACCESS_KEY": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "SLLM_STORE_URL": "s3://models/sllm",
            "SLLM_S3_ENDPOINT": f"http://{store.address}:8333",
        }
        _make_bucket(store_env, "models")
        push_checkpoint(root / "ckpt", open_store(StoreSettings.from_env(store_env)), KEY)
        env = {
            **os.environ,
            **store_env,
            "SLLM_NODE_ID": "node-a",
            "SLLM_NODE_HOST": node_host.address,
            **nats_client_env(nats, "node-a"),
            "SLLM_CACHE_DIR": str(root / "cache"),
            "SLLM_CPU_SLOTS": "1",
            "SLLM_POOL_SIZE": "1",
            # the transformers backend only: no vLLM process (links and placement are what is
            # tested here; tests/integration/faults runs its faults on the vLLM backend)
            "SLLM_VLLM": "off",
            "SLLM_HEARTBEAT_INTERVAL": "0.3s",
            "SLLM_STORE_BANDWIDTH": str(int(SEED_BW)),
        }
        log_path = root / "node.log"
        with open(log_path, "wb") as log:
            node = subprocess.Popen(
                [
                    *node_host.wrap,
                    sys.executable,
                    "-m",
                    "sllm_cli.main",
                    "node",
                    "start",
                    "--drain",
                    "2s",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        yield World(topo, nats_client_env(nats), index.total_bytes, node, log_path)
    finally:
        if node is not None:
            stop_process(node, 30)
        for server in reversed(servers):
            server.stop()
        if node is not None:
            import shutil

            from runtime.node.main import dram_root
            from sllm.settings import NodeSettings

            shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)


def _make_bucket(env: dict[str, str], name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["SLLM_S3_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id=env["SLLM_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=env["SLLM_S3_SECRET_ACCESS_KEY"],
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=name)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


async def test_a_node_pulls_a_checkpoint_over_its_shaped_link(world: World) -> None:
    env = world.gateway_env
    bus = await NatsBus.connect(
        env["SLLM_NATS_URL"], "hosts-test", seed_file=env["SLLM_NATS_SEED_FILE"]
    )
    events: asyncio.Queue[InstanceEvent] = asyncio.Queue()
    beats: asyncio.Queue[NodeHeartbeat] = asyncio.Queue()

    async def on_event(msg: Message) -> None:
        await events.put(decode_as(msg.data, InstanceEvent))

    async def on_beat(msg: Message) -> None:
        await beats.put(decode_as(msg.data, NodeHeartbeat))

    await bus.subscribe(EVENTS, on_event)
    await bus.subscribe(HEARTBEATS, on_beat)
    try:
        first = await asyncio.wait_for(beats.get(), 120)
        assert first.bandwidths["store"] == SEED_BW
        spec = FunctionSpec(name="tiny", model="tiny", handler="chat")
        record = FunctionRecord(spec=spec, checkpoint=KEY, checkpoint_bytes=world.checkpoint_bytes)
        cmd = LoadCmd("hosts-i1", "tiny", record.to_dict(), "")
        reply = decode_as(await bus.request(node_cmd_subject("node-a"), encode(cmd), 30), CmdReply)
        assert reply.ok, reply
        event = await asyncio.wait_for(events.get(), 120)
        assert event.kind == "ready", event
        assert event.tier == "store"
        rate = netns.rate_bytes_per_s(NODE_RATE)
        # The pull alone takes size / rate at least: a shaped link cannot be faster.
        assert event.load_s >= world.checkpoint_bytes / rate * 0.95
        while True:  # the first heartbeat after the pull carries the folded-in observation
            beat = await asyncio.wait_for(beats.get(), 10)
            if beat.bandwidths["store"] != SEED_BW:
                break
        observed = (beat.bandwidths["store"] - (1 - ALPHA) * SEED_BW) / ALPHA
        assert 0.6 * rate < observed <= 1.05 * rate, (observed, rate)
        # The instance listens on the node host's address, reached over the bridge.
        assert event.address is not None and world.topo["node-a"].address in event.address
        async with httpx.AsyncClient() as client:
            health = await client.get(
                f"{event.address}/healthz", headers=auth_header(event.secret), timeout=10
            )
        assert health.status_code == 200
        await bus.request(node_cmd_subject("node-a"), encode(UnloadCmd("hosts-i1", 1.0)), 10)
    finally:
        await bus.close()
    assert world.node.poll() is None, world.node_log.read_text()[-3000:]
