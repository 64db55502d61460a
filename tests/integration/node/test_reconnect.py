"""The node survives a NATS outage: heartbeats resume and commands are answered again."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.node.main import dram_root
from sllm.bus import Message
from sllm.messages import (
    HEARTBEATS,
    CmdReply,
    NodeHeartbeat,
    UnloadCmd,
    decode_as,
    encode,
    node_cmd_subject,
)
from sllm.nats_auth import NatsCredentials
from sllm.nats_bus import NatsBus
from sllm.settings import NodeSettings
from sllm_cli.servers import ManagedServer, free_port, nats_client_env, start_nats

pytestmark = pytest.mark.integration


async def _next_heartbeat(outage: Outage, node_id: str, timeout_s: float) -> NodeHeartbeat:
    bus = await NatsBus.connect(outage.url, name="reconnect-test", seed_file=outage.gateway_seed)
    beats: asyncio.Queue[NodeHeartbeat] = asyncio.Queue()

    async def on_beat(msg: Message) -> None:
        beat = decode_as(msg.data, NodeHeartbeat)
        if beat.node_id == node_id:
            await beats.put(beat)

    await bus.subscribe(HEARTBEATS, on_beat)
    try:
        return await asyncio.wait_for(beats.get(), timeout_s)
    finally:
        await bus.close()


@dataclass
class Outage:
    port: int
    data: Path
    nats: ManagedServer
    node: subprocess.Popen[bytes]
    creds: NatsCredentials

    @property
    def gateway_seed(self) -> Path:
        return self.creds.gateway()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    port = free_port()
    creds = NatsCredentials(tmp_path / "creds")
    creds.gateway()
    creds.node("reconnect-node")
    nats = start_nats(tmp_path / "nats", port=port, credentials=creds)
    env = {
        **os.environ,
        **nats_client_env(nats, "reconnect-node"),
        "SLLM_NODE_ID": "reconnect-node",
        "SLLM_STORE_URL": str(tmp_path / "store"),
        "SLLM_CACHE_DIR": str(tmp_path / "cache"),
        "SLLM_POOL_SIZE": "0",
        "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
        "SLLM_HEARTBEAT_INTERVAL": "0.2s",
    }
    node = subprocess.Popen(
        [sys.executable, "-m", "sllm_cli.main", "node", "start", "--drain", "1s"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = Outage(port, tmp_path / "nats", nats, node, creds)
    yield state
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=30)
    state.nats.stop()
    shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)


async def test_node_reconnects_after_a_nats_outage(outage: Outage) -> None:
    first = await _next_heartbeat(outage, "reconnect-node", 90)
    outage.nats.stop()
    await asyncio.sleep(1.0)
    outage.nats = start_nats(outage.data, port=outage.port, credentials=outage.creds)
    later = await _next_heartbeat(outage, "reconnect-node", 30)
    assert later.seq > first.seq
    bus = await NatsBus.connect(outage.url, name="reconnect-cmd", seed_file=outage.gateway_seed)
    raw = await bus.request(node_cmd_subject("reconnect-node"), encode(UnloadCmd("x")), 10)
    await bus.close()
    assert decode_as(raw, CmdReply).ok
    assert outage.node.poll() is None
