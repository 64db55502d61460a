"""A node running each instance in its own container (SLLM_INSTANCES=container), driven over
NATS as the gateway drives it, and the sandbox facts checked from inside a handler.

One node for the module (real NATS, `sllm node start`, podman with runc), the tiny model in a
local-directory store under two keys (this function's checkpoint and another function's).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from runtime.container.podman import Podman
from sllm.instance_auth import auth_header
from sllm.messages import LoadCmd, encode
from sllm.spec import FunctionRecord, FunctionSpec, Resources
from sllm_cli.servers import ManagedServer, nats_client_env
from tests.integration.node.conftest import (
    CHECKPOINT_KEY,
    NodeClient,
    NodeProcess,
    node_client,
    node_process,
)

# 1200 s: the first test also waits for the session's images (a fresh machine: minutes)
pytestmark = [pytest.mark.containers, pytest.mark.integration, pytest.mark.timeout(1200)]

OTHER_KEY = "checkpoints/other/1111111111111111"
SECRET = uuid.uuid4().hex  # in the node's credentials: never inside a container


@pytest.fixture(scope="module")
def container_node(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: ManagedServer,
    tiny_model_dir: Path,
    runtime_image: str,
    podman: Podman,
) -> Iterator[NodeProcess]:
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    root = tmp_path_factory.mktemp("cnode")
    env = {
        "SLLM_INSTANCES": "container",
        "SLLM_INSTANCE_IMAGE": runtime_image,
        # credentials the node holds beside its NATS seed: the store's
        "AWS_ACCESS_KEY_ID": f"key-{SECRET}",
        "AWS_SECRET_ACCESS_KEY": f"secret-{SECRET}",
        "SLLM_DRAM_CAPACITY": "512Mi",
    }
    with node_process(root, nats_server, tiny_model_dir, env, stop_timeout_s=60) as node:
        push_checkpoint(root / "ckpt", LocalStore(root / "store"), OTHER_KEY)
        yield node
    assert not podman.run("ps", "-aq", "--filter", f"name=^sllm-{node.node_id}-").stdout


@pytest.fixture
async def client(
    container_node: NodeProcess, nats_url: str, nats_seed: str
) -> AsyncIterator[NodeClient]:
    async with node_client(container_node, nats_url, nats_seed, up_timeout_s=300) as c:
        yield c


def make_record(
    name: str,
    handler: str = "chat",
    source: dict[str, str] | None = None,
    requirements: str = "",
    checkpoint: str = CHECKPOINT_KEY,
    memory: int = 2 << 30,
) -> dict[str, Any]:
    spec = FunctionSpec(name=name, model="tiny", handler=handler, resources=Resources(1, memory))
    return FunctionRecord(
        spec, checkpoint, 1, handler_source=source or {}, requirements=requirements
    ).to_dict()


@dataclass(frozen=True)
class Started:
    address: str
    secret: str  # the instance answers nothing without it (sllm.instance_auth)


async def start(client: NodeClient, record: dict[str, Any], timeout_s: float = 300) -> Started:
    instance_id = f"{record['spec']['name']}-{uuid.uuid4().hex[:6]}"
    cmd = LoadCmd(instance_id, record["spec"]["name"], record, "")
    reply = await client.command(encode(cmd))
    assert reply.ok, reply
    event = await client.event(instance_id, timeout_s)
    assert event.kind == "ready", event.error
    assert event.address
    return Started(event.address, event.secret)


async def stop(client: NodeClient, started: Started) -> None:
    for state in (await client.heartbeat()).instances:
        if state.address == started.address:
            await client.unload(state.instance_id, drain_s=1.0)
            assert (await client.event(state.instance_id)).kind == "stopped"


async def invoke(started: Started, body: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(timeout=120, headers=auth_header(started.secret)) as http:
        response = await http.post(f"{started.address}/v1/invoke", json=body)
        assert response.status_code == 200, response.text
        return response.json()


async def test_instance_runs_in_a_container_and_answers(
    client: NodeClient, container_node: NodeProcess, podman: Podman
) -> None:
    # another function's checkpoint: it stays in the node's DRAM tier after this instance stops
    # (the sandbox test below must not see it)
    other = await start(client, make_record("other", checkpoint=OTHER_KEY))
    answer = await invoke(other, {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert answer["usage"]["completion_tokens"] == 4
    running = podman.run(
        "ps", "--format", "{{.Image}}", "--filter", f"name=^sllm-{container_node.node_id}-"
    ).stdout.decode()
    assert "sllm-runtime" in running  # the instance and the refilled pool's container
    await weights_follow_priority(client, container_node, podman)
    await stop(client, other)


async def weights_follow_priority(client: NodeClient, node: NodeProcess, podman: Podman) -> None:
    """A pool container's cgroup weighs as a background one against the instance's:
    SCHED_IDLE inside a cgroup ranks it below that cgroup's threads only."""
    from runtime.container.cgroups import SHARES, WEIGHT, cgroup_dirs
    from runtime.node.priority import idle_nice, policy_of

    if not idle_nice():
        pytest.skip("no CAP_SYS_NICE: pool containers start at the node's priority")
    for _ in range(120):  # the refill, after the first answer (a heartbeat each)
        if (await client.heartbeat()).pool_idle >= 1:
            break
    else:
        raise AssertionError("the pool did not refill")
    names = podman.run("ps", "--format", "{{.Names}}", "--filter", f"name=^sllm-{node.node_id}-")
    seen = set()
    for name in names.stdout.decode().split():
        pid = int(podman.run("inspect", "--format", "{{.State.Pid}}", name).stdout)
        idle = set(policy_of(pid)) == {os.SCHED_IDLE}
        dirs = cgroup_dirs(pid)
        if "" in dirs:
            assert (dirs[""] / "cpu.weight").read_text().strip() == str(WEIGHT[idle])
        else:
            assert (dirs["cpu"] / "cpu.shares").read_text().strip() == str(SHARES[idle])
        seen.add(idle)
    assert seen == {True, False}  # the idle container and the instance's


PROBE_HANDLER = """
import os

def _read(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False

def _write(path):
    try:
        with open(path, "wb") as f:
            f.write(b"x")
        return True
    except OSError:
        return False

def handle(request, ctx):
    visible = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    visible.append(f.read().decode(errors="replace"))
            except OSError:
                pass
    return {
        "read": {p: _read(p) for p in request["read"]},
        "exists": {p: os.path.exists(p) for p in request["exists"]},
        "write": {p: _write(p) for p in request["write"]},
        "dram": sorted(os.listdir("/sllm/dram/entries")),
        "processes": "\\n".join(visible),
        "environ": dict(os.environ),
        "answer": ctx.generate(prompt="hi", max_tokens=2, temperature=0)["usage"],
    }
"""


async def test_sandbox_facts_from_inside_a_handler(
    client: NodeClient, container_node: NodeProcess, nats_server: ManagedServer
) -> None:
    from runtime.node.main import dram_root
    from sllm.settings import NodeSettings

    # another function's checkpoint in the node's DRAM tier (the first test left it there)
    if not any(e.checkpoint == OTHER_KEY for e in (await client.heartbeat()).cache.get("dram", [])):
        await stop(client, await start(client, make_record("other", checkpoint=OTHER_KEY)))
    await asyncio.sleep(1.0)  # heartbeats: the pool's idle container premaps what it may
    root = container_node.log_path.parent
    tier = dram_root(NodeSettings.from_env({"SLLM_NODE_ID": container_node.node_id,
                                            "SLLM_CACHE_DIR": str(root / "cache")}))  # fmt: skip
    own = f"/sllm/dram/entries/{quote(CHECKPOINT_KEY, safe='')}"
    other_entry = quote(OTHER_KEY, safe="")
    # the node's NATS credentials: its NKey seed file
    seed_file = Path(nats_client_env(nats_server, container_node.node_id)["SLLM_NATS_SEED_FILE"])
    seed = (await asyncio.to_thread(seed_file.read_text)).strip()
    probe = await start(client, make_record("probe", "probe:handle", {"probe.py": PROBE_HANDLER}))
    facts = await invoke(probe, {
        "read": [f"{own}/index.json", f"/sllm/dram/entries/{other_entry}/index.json",
                 str(tier / "entries" / other_entry / "index.json"), str(seed_file)],
        "exists": [str(root / "cache"), str(root / "store"), str(tier), "/dev/shm/" + tier.name,
                   str(seed_file.parent)],
        "write": ["/tmp/scratch", "/opt/venv/x", "/x", "/sllm/x", f"{own}/x"],
    })  # fmt: skip
    await stop(client, probe)
    assert facts["answer"]["completion_tokens"] == 2  # the model answers from inside
    # its own checkpoint, read-only; no other function's, by either path
    assert facts["dram"] == [quote(CHECKPOINT_KEY, safe="")]
    assert list(facts["read"].values()) == [True, False, False, False]
    # not the node's cache directory, store, DRAM tier or NATS credentials
    assert not any(facts["exists"].values()), facts["exists"]
    # scratch space only
    assert facts["write"] == {
        "/tmp/scratch": True, "/opt/venv/x": False, "/x": False, "/sllm/x": False,
        f"{own}/x": False,
    }  # fmt: skip
    # no credentials of the node: not in its environment, not in any process it can see
    for secret in (SECRET, seed):
        assert secret not in json.dumps(facts["environ"]) and secret not in facts["processes"]
    assert not any(k.startswith(("AWS_", "SLLM_NATS", "SLLM_TOKEN")) for k in facts["environ"])


HOG_HANDLER = """
def handle(request, ctx):
    hog = b"x" * (int(request["mib"]) << 20)
    return {"len": len(hog)}
"""


async def test_memory_limit_kills_the_instance_and_the_node_goes_on(
    client: NodeClient, container_node: NodeProcess
) -> None:
    record = make_record("hog", "hog:handle", {"hog.py": HOG_HANDLER}, memory=1 << 30)
    instance_id = f"hog-{uuid.uuid4().hex[:6]}"
    reply = await client.command(encode(LoadCmd(instance_id, "hog", record, "")))
    assert reply.ok, reply
    ready = await client.event(instance_id, 300)
    assert ready.kind == "ready", ready.error
    assert ready.address
    async with httpx.AsyncClient(timeout=120, headers=auth_header(ready.secret)) as http:
        small = await http.post(f"{ready.address}/v1/invoke", json={"mib": 64})
        assert small.json() == {"len": 64 << 20}  # under the limit: fine
        with pytest.raises(httpx.HTTPError):
            await http.post(f"{ready.address}/v1/invoke", json={"mib": 2048})
    failed = await client.event(instance_id, 60)
    assert failed.kind == "failed"
    assert "code 137" in failed.error and "out of memory" in failed.error, failed.error
    # conmon's ``oom`` marker stays out of the node's working directory (its root here)
    assert not (container_node.log_path.parent / "oom").exists()
    # the node goes on: another instance starts and answers
    after = await start(client, make_record("after-oom"))
    answer = await invoke(after, {"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert answer["usage"]["completion_tokens"] == 2
    await stop(client, after)
