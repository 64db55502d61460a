"""A real node with the vLLM backend: `sllm node start` as a child process on a real NATS
server, SLLM_VLLM=on, one pre-started vLLM process and one transformers one, two CPU slots.
Tiny checkpoints in its store: ``vtiny`` (head size 64, which vLLM's CPU attention runs),
``vtiny2`` (the same configuration, other weights) and ``tiny16`` (head size 16, which it
does not). One node per test module: starting a vLLM
engine costs seconds, importing vLLM tens of seconds on this machine."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.messages import (
    EVENTS,
    HEARTBEATS,
    InstanceEvent,
    LoadCmd,
    NodeHeartbeat,
    decode_as,
    encode,
)
from sllm.nats_auth import NatsCredentials
from sllm.nats_bus import NatsBus
from sllm.spec import FunctionRecord, FunctionSpec
from sllm_cli.servers import ManagedServer, nats_client_env, start_nats
from tests.integration.gateway.conftest import AUTH, TOKEN, Cluster
from tests.integration.node.conftest import NodeClient, NodeProcess, started_node


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without vLLM installed (a venv without the vllm extra, as `make test-latest`'s second
    resolution is) these tests cannot run: they are skipped, saying why, not failed."""
    if importlib.util.find_spec("vllm") is not None:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="vLLM is not installed (the vllm extra of pyproject.toml)")
    for item in items:
        if here in item.path.parents:
            item.add_marker(skip)


CHECKPOINTS = {
    "vtiny": "checkpoints/vtiny/0000000000000000",
    "vtiny2": "checkpoints/vtiny2/0000000000000000",  # vtiny's configuration, other weights
    "tiny16": "checkpoints/tiny16/0000000000000000",
    "vtools": "checkpoints/vtools/0000000000000000",  # vtiny's configuration, renders tools
}


# A chat template that renders tools (the tiny model's own does not), for vtools.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>You may call: {{ tools | tojson }}<|end|>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class VllmNode:
    process: NodeProcess
    hf_dirs: dict[str, Path]
    store: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def vllm_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    """This module's own nats-server: a gateway on it sees only this module's vLLM node (and
    its JetStream registry is this module's)."""
    root = tmp_path_factory.mktemp("nats")
    creds = NatsCredentials(root / "creds")
    creds.gateway()
    server = start_nats(root, credentials=creds)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    vllm_node: VllmNode, vllm_nats: ManagedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """`sllm gateway start` on this module's NATS, in front of the vLLM node."""
    env = {**vllm_node.env, **nats_client_env(vllm_nats), "SLLM_TOKEN": TOKEN, "SLLM_WAKE_TIMEOUT": "300s",
           "SLLM_POLICY": "least-loaded", "SLLM_SCALE_DOWN_WINDOW": "1s"}  # fmt: skip
    cluster = Cluster(tmp_path_factory.mktemp("vllm-gateway"), vllm_nats, env, 0)
    cluster.node = vllm_node.process.process  # watched while waiting for its heartbeat
    try:
        cluster.start_gateway()
        cluster.wait_for_node()
        yield cluster
    finally:
        cluster.stop_gateway()


def deploy(gateway: Cluster, name: str, checkpoint: str, **spec: Any) -> dict[str, Any]:
    """Register a function through the gateway's API (what `sllm fn deploy` ends with)."""
    body = {
        "spec": {
            "name": name,
            "model": checkpoint,
            "auth": "public",
            "resources": {"memory": "256Mi"},
            **spec,
        },
        "checkpoint": CHECKPOINTS[checkpoint],
        "checkpoint_bytes": 1,
    }
    r = httpx.post(f"{gateway.url}/system/functions", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


@pytest.fixture(scope="module")
def vllm_node(
    tmp_path_factory: pytest.TempPathFactory, vllm_nats: ManagedServer
) -> Iterator[VllmNode]:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint
    from tests.tiny_model import VLLM_TINY, TinyConfig, build_tiny_llama

    root = tmp_path_factory.mktemp("vllm-node")
    store_dir = root / "store"
    store_dir.mkdir()
    hf_dirs = {
        "vtiny": build_tiny_llama(root / "hf-vtiny", seed=3, config=VLLM_TINY),
        "vtiny2": build_tiny_llama(root / "hf-vtiny2", seed=4, config=VLLM_TINY),
        "tiny16": build_tiny_llama(root / "hf-tiny16", seed=0, config=TinyConfig()),
        "vtools": build_tiny_llama(root / "hf-vtools", seed=5, config=VLLM_TINY),
    }
    (hf_dirs["vtools"] / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    for name, hf in hf_dirs.items():
        convert_checkpoint(hf, root / f"ckpt-{name}")
        push_checkpoint(root / f"ckpt-{name}", LocalStore(store_dir), CHECKPOINTS[name])
    # one vLLM process, no spare: a load of another model frees the engine that one holds
    extra = {"SLLM_VLLM": "on", "SLLM_VLLM_POOL_SIZE": "1", "SLLM_VLLM_SPARE": "0"}
    with started_node(root, vllm_nats, store_dir, "vllm", extra) as (node_id, proc, env):
        yield VllmNode(NodeProcess(node_id, proc, root / "node.log", 0), hf_dirs, store_dir, env)


def vllm_record(
    function: str,
    checkpoint: str = "vtiny",
    backend: str = "vllm",
    memory_bytes: int = 256 << 20,
    **spec: Any,
) -> dict[str, Any]:
    """A registry record of ``function`` serving ``checkpoint``; 256Mi of memory by default:
    weights plus a KV cache kept small (several engines and test runs share this machine)."""
    from sllm.spec import Resources

    resources = Resources(memory_bytes=memory_bytes)
    fspec = FunctionSpec(
        name=function, model=checkpoint, backend=backend, resources=resources, **spec
    )
    return FunctionRecord(fspec, CHECKPOINTS[checkpoint], 1).to_dict()


class VllmNodeClient(NodeClient):
    async def load_record(self, instance_id: str, record: dict[str, Any], device: str = "") -> Any:
        cmd = LoadCmd(instance_id, record["spec"]["name"], record, device)
        return await self.command(encode(cmd))


async def connect(node: NodeProcess, nats: ManagedServer) -> VllmNodeClient:
    """A client following the node's events and heartbeats as the gateway does (close its
    ``bus``)."""
    env = nats_client_env(nats)
    bus = await NatsBus.connect(env["SLLM_NATS_URL"], name="vllm-test",
                                seed_file=env["SLLM_NATS_SEED_FILE"])  # fmt: skip
    c = VllmNodeClient(bus, node)

    async def on_event(msg: Any) -> None:
        await c.events.put(decode_as(msg.data, InstanceEvent))

    async def on_heartbeat(msg: Any) -> None:
        beat = decode_as(msg.data, NodeHeartbeat)
        if beat.node_id == node.node_id:
            await c.heartbeats.put(beat)

    await bus.subscribe(EVENTS, on_event)
    await bus.subscribe(HEARTBEATS, on_heartbeat)
    await c.heartbeat(timeout_s=120.0)  # the node is up
    return c


@pytest.fixture
async def vclient(vllm_node: VllmNode, vllm_nats: ManagedServer) -> AsyncIterator[VllmNodeClient]:
    c = await connect(vllm_node.process, vllm_nats)
    yield c
    await c.bus.close()


def load_ready(
    node: VllmNode, nats: ManagedServer, instance_id: str, record: dict[str, Any]
) -> InstanceEvent:
    """Load ``record`` on the node and wait for its ready (or failed) event (for module-scoped
    fixtures: its own event loop)."""

    async def run() -> InstanceEvent:
        c = await connect(node.process, nats)
        try:
            reply = await c.load_record(instance_id, record)
            assert reply.ok, reply
            return await c.event(instance_id, timeout_s=300.0)
        finally:
            await c.bus.close()

    return asyncio.run(run())
