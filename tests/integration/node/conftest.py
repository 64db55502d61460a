"""A real node (`sllm node start` as a child process) on a real NATS server, with the tiny
model converted and pushed into a local-directory store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sllm.messages import (
    EVENTS,
    HEARTBEATS,
    LOGS,
    CmdReply,
    InstanceEvent,
    LoadCmd,
    LogLine,
    NodeHeartbeat,
    UnloadCmd,
    decode_as,
    encode,
    node_cmd_subject,
)
from sllm.nats_bus import NatsBus
from sllm.spec import FunctionRecord, FunctionSpec
from sllm_cli.servers import ManagedServer, nats_client_env

CHECKPOINT_KEY = "checkpoints/tiny/0000000000000000"


@dataclass(frozen=True)
class NodeProcess:
    node_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    checkpoint_bytes: int


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, nats_server: ManagedServer, tiny_model_dir: Path
) -> Iterator[NodeProcess]:
    with node_process(tmp_path_factory.mktemp("node"), nats_server, tiny_model_dir) as proc:
        yield proc


@contextlib.contextmanager
def node_process(
    root: Path,
    nats_server: ManagedServer,
    tiny_model_dir: Path,
    extra_env: dict[str, str] | None = None,
    stop_timeout_s: float = 30.0,
) -> Iterator[NodeProcess]:
    """`sllm node start` on the tiny model pushed into a local-directory store under ``root``;
    stopped (SIGTERM) and its DRAM tier removed on exit."""
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    index = convert_checkpoint(tiny_model_dir, root / "ckpt")
    store_dir = root / "store"
    store_dir.mkdir()
    push_checkpoint(root / "ckpt", LocalStore(store_dir), CHECKPOINT_KEY)
    started = started_node(root, nats_server, store_dir, "it", extra_env, stop_timeout_s)
    with started as (node_id, proc, _):
        yield NodeProcess(node_id, proc, root / "node.log", index.total_bytes)


@contextlib.contextmanager
def started_node(
    root: Path,
    nats_server: ManagedServer,
    store_dir: Path,
    prefix: str,
    extra_env: dict[str, str] | None = None,
    stop_timeout_s: float = 30.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, str]]]:
    """`sllm node start` (id ``prefix``-pid-time, log ``root``/node.log) on ``store_dir``,
    the transformers backend only unless ``extra_env`` says otherwise; yields its id, process
    and environment. Stopped (SIGTERM) and its DRAM tier removed on exit."""
    node_id = f"{prefix}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    env = {
        **os.environ,
        "SLLM_NODE_ID": node_id,
        **nats_client_env(nats_server, node_id),
        "SLLM_STORE_URL": str(store_dir),
        "SLLM_CACHE_DIR": str(root / "cache"),
        "SLLM_DRAM_CAPACITY": "256Mi",
        "SLLM_SSD_CAPACITY": "256Mi",
        "SLLM_CPU_SLOTS": "2",
        "SLLM_POOL_SIZE": "1",
        "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
        "SLLM_HEARTBEAT_INTERVAL": "0.3s",
        **(extra_env or {}),
    }
    with open(root / "node.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", "-v", "node", "start", "--drain", "2s"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,  # whatever a node leaves in its working directory shows up under root
        )
    try:
        yield node_id, proc, env
    finally:
        _stop(proc, env, stop_timeout_s)


def _stop(proc: subprocess.Popen[bytes], env: dict[str, str], timeout_s: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    import shutil

    from runtime.node.main import dram_root
    from sllm.settings import NodeSettings

    shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)


def record(function: str = "tiny", handler: str = "chat", **extra: Any) -> dict[str, Any]:
    spec = FunctionSpec(name=function, model="tiny", handler=handler)
    rec = FunctionRecord(spec=spec, checkpoint=CHECKPOINT_KEY, checkpoint_bytes=1, **extra)
    return rec.to_dict()


class NodeClient:
    """Talks to the node as the gateway does: commands, events, heartbeats."""

    def __init__(self, bus: NatsBus, node: NodeProcess) -> None:
        self.bus = bus
        self.node = node
        self.events: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        self.heartbeats: asyncio.Queue[NodeHeartbeat] = asyncio.Queue()
        self.logs: asyncio.Queue[LogLine] = asyncio.Queue()

    async def command(self, payload: bytes, timeout_s: float = 30.0) -> CmdReply:
        raw = await self.bus.request(node_cmd_subject(self.node.node_id), payload, timeout_s)
        return decode_as(raw, CmdReply)

    async def load(self, instance_id: str, device: str = "", **kw: Any) -> CmdReply:
        rec = record(**kw)
        cmd = LoadCmd(instance_id, rec["spec"]["name"], rec, device)
        return await self.command(encode(cmd))

    async def unload(self, instance_id: str, drain_s: float = 5.0) -> CmdReply:
        return await self.command(encode(UnloadCmd(instance_id, drain_s)))

    async def event(self, instance_id: str, timeout_s: float = 90.0) -> InstanceEvent:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no event for {instance_id} in {timeout_s}s")
            event = await asyncio.wait_for(self.events.get(), remaining)
            if event.instance_id == instance_id:
                return event
            await self.events.put(event)
            await asyncio.sleep(0.02)

    async def free_devices(self, timeout_s: float = 60.0) -> None:
        """Unload whatever a test left on the node (one that failed half-way, say), so the
        next test starts with every device free instead of failing for want of one."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = [d.instance_id for d in (await self.heartbeat()).devices if d.instance_id]
            if not held:
                return
            assert time.monotonic() < deadline, f"devices still held by {held}"
            for instance_id in held:
                await self.unload(instance_id, drain_s=0.0)
            await asyncio.sleep(0.2)

    async def log_line(self, containing: str, timeout_s: float = 10.0) -> LogLine:
        """The next log line of an instance that contains ``containing``."""
        while True:
            line = await asyncio.wait_for(self.logs.get(), timeout_s)
            if containing in line.line:
                return line

    async def heartbeat(self, timeout_s: float = 10.0) -> NodeHeartbeat:
        while not self.heartbeats.empty():
            self.heartbeats.get_nowait()
        return await asyncio.wait_for(self.heartbeats.get(), timeout_s)


@pytest.fixture
async def client(node: NodeProcess, nats_url: str, nats_seed: str) -> AsyncIterator[NodeClient]:
    async with node_client(node, nats_url, nats_seed) as c:
        yield c


@contextlib.asynccontextmanager
async def node_client(
    node: NodeProcess, nats_url: str, nats_seed: str, up_timeout_s: float = 90.0
) -> AsyncIterator[NodeClient]:
    """A gateway-role client of ``node``; on exit it unloads what a test left on the node."""
    bus = await NatsBus.connect(nats_url, name="node-test", seed_file=nats_seed)
    c = NodeClient(bus, node)

    async def on_event(msg: Any) -> None:
        await c.events.put(decode_as(msg.data, InstanceEvent))

    async def on_heartbeat(msg: Any) -> None:
        beat = decode_as(msg.data, NodeHeartbeat)
        if beat.node_id == node.node_id:
            await c.heartbeats.put(beat)

    async def on_log(msg: Any) -> None:
        await c.logs.put(decode_as(msg.data, LogLine))

    await bus.subscribe(EVENTS, on_event)
    await bus.subscribe(LOGS, on_log)
    await bus.subscribe(HEARTBEATS, on_heartbeat)
    try:
        await c.heartbeat(timeout_s=up_timeout_s)  # the node is up
        yield c
    finally:
        try:
            await c.free_devices()
        finally:
            await bus.close()
