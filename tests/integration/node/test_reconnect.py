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
from sllm.nats_bus import NatsBus
from sllm.servers import ManagedServer, free_port, start_nats
from sllm.settings import NodeSettings

pytestmark = pytest.mark.integration


async def _next_heartbeat(url: str, node_id: str, timeout_s: float) -> NodeHeartbeat:
    bus = await NatsBus.connect(url, name="reconnect-test")
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

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    port = free_port()
    nats = start_nats(tmp_path / "nats", port=port)
    env = {
        **os.environ,
        "SLLM_NODE_ID": "reconnect-node",
        "SLLM_NATS_URL": f"nats://127.0.0.1:{port}",
        "SLLM_STORE_URL": str(tmp_path / "store"),
        "SLLM_CACHE_DIR": str(tmp_path / "cache"),
        "SLLM_POOL_SIZE": "0",
        "SLLM_HEARTBEAT_INTERVAL": "0.2s",
    }
    node = subprocess.Popen(
        [sys.executable, "-m", "sllm.cli.main", "node", "start", "--drain", "1s"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = Outage(port, tmp_path / "nats", nats, node)
    yield state
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=30)
    state.nats.stop()
    shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)


async def test_node_reconnects_after_a_nats_outage(outage: Outage) -> None:
    first = await _next_heartbeat(outage.url, "reconnect-node", 90)
    outage.nats.stop()
    await asyncio.sleep(1.0)
    outage.nats = start_nats(outage.data, port=outage.port)
    later = await _next_heartbeat(outage.url, "reconnect-node", 30)
    assert later.seq > first.seq
    bus = await NatsBus.connect(outage.url, name="reconnect-cmd")
    raw = await bus.request(node_cmd_subject("reconnect-node"), encode(UnloadCmd("x")), 10)
    await bus.close()
    assert decode_as(raw, CmdReply).ok
    assert outage.node.poll() is None
