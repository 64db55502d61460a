"""Two real nodes (`sllm node start` processes, one CPU slot each), the gateway process and
its own nats-server, with the tiny model in a local-directory store: the stage for live
migration between nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.instance_auth import auth_header
from sllm.nats_auth import NatsCredentials
from sllm_cli.servers import ManagedServer, free_port, nats_client_env, start_nats, stop_process
from tests import secret_scan
from tests.instance_secrets import instance_secret

TOKEN = "mig-token"
secret_scan.register(TOKEN)
AUTH = {"authorization": f"Bearer {TOKEN}"}
CHECKPOINT_KEY = "checkpoints/tiny/it-migration"
FUNCTION = "mig"
# Seconds a stream here (more while the machine is busy): the switch, a few tenths of a
# second after the stream starts, happens well before the end.
MAX_TOKENS = 1200


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    stop_process(proc, timeout_s)


@dataclass
class Stage:
    root: Path
    nats: ManagedServer
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    gateway: subprocess.Popen[bytes] | None = None
    port: int = field(default_factory=free_port)
    _http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats.ports['client']}"

    def log_tail(self, name: str, n: int = 60) -> str:
        path = self.root / name
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-n:])

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{self.log_tail(name)}"
            for name in ["gateway.log", *(f"{n}.log" for n in self.nodes)]
        )

    @property
    def http(self) -> httpx.Client:
        """One client for the stage: making one per call costs 0.1-2 s on a busy machine (its
        TLS context), long enough for a stream to end before a test moves it."""
        if self._http is None:
            self._http = httpx.Client(timeout=120, trust_env=False, verify=False)
        return self._http

    def instances(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/system/functions/{FUNCTION}", headers=AUTH)
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["instances"]
        return found

    def wait_ready(
        self, count: int = 1, timeout_s: float = 120.0, *, gone: str = ""
    ) -> list[dict[str, Any]]:
        """Wait until exactly ``count`` instances are ready and none is starting/draining.
        ``gone``: an instance a test killed, which must have left the list too (until its node
        reports it, the gateway still lists it as ready)."""
        deadline = time.monotonic() + timeout_s
        while True:
            insts = self.instances()
            if (
                len(insts) == count
                and all(i["state"] == "ready" for i in insts)
                and gone not in {i["id"] for i in insts}
            ):
                return insts
            assert time.monotonic() < deadline, f"instances: {insts}\n{self.logs()}"
            time.sleep(0.1)

    def streams(self, inst: dict[str, Any]) -> dict[str, int]:
        """Request id -> output tokens so far of the streams running on ``inst`` (an entry of
        ``instances``), as its engine reports them (ahead of what a client has read)."""
        try:
            headers = auth_header(instance_secret(self.env, inst["id"]))
            r = self.http.get(
                f"{inst['address']}/v1/migration/requests", timeout=30, headers=headers
            )
        except httpx.HTTPError:
            return {}  # gone (a test killed it) or going
        return {s["request_id"]: len(s["output_ids"]) for s in r.json()["requests"]}

    def wait_streams(
        self, request_ids: set[str] | None = None, min_tokens: int = 2, timeout_s: float = 60.0
    ) -> list[tuple[dict[str, Any], dict[str, int]]]:
        """Wait until every stream of ``request_ids`` (None: some stream) runs with at least
        ``min_tokens`` output tokens on some instance; then (instance, its streams) for each
        instance, busiest first."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = [(inst, self.streams(inst)) for inst in self.instances()]
            running = {rid for _, streams in seen for rid, n in streams.items() if n >= min_tokens}
            if (request_ids is None and running) or (request_ids and request_ids <= running):
                return sorted(seen, key=lambda x: -len(x[1]))
            assert time.monotonic() < deadline, f"streams not running: {seen}\n{self.logs()}"
            time.sleep(0.01)

    def serving(self, request_id: str | None = None, min_tokens: int = 2) -> dict[str, Any]:
        """The instance streaming ``request_id`` (None: the busiest one), once it has
        generated ``min_tokens`` tokens for it."""
        ids = None if request_id is None else {request_id}
        for inst, streams in self.wait_streams(ids, min_tokens):
            if request_id is None or request_id in streams:
                return inst
        raise AssertionError(f"no instance streams {request_id}")

    def wait_log(self, node_id: str, text: str, timeout_s: float = 60.0) -> None:
        """Wait until ``text`` appears in node ``node_id``'s log."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_tail(f"{node_id}.log", 400):
            assert time.monotonic() < deadline, f"{text!r} not logged by {node_id}\n{self.logs()}"
            time.sleep(0.02)

    def migrate(self, target_node: str, **source: str) -> httpx.Response:
        body = {**source, "target_node": target_node}
        return self.http.post(f"{self.url}/system/migrate", json=body, headers=AUTH)


def stage_env(nats: ManagedServer, store: Path, policy: str) -> dict[str, str]:
    """Environment of a two-node stage: its NATS and local-directory store, one CPU slot and
    one pre-started process per node, fast heartbeats, small caches."""
    return {
        **os.environ,
        **nats_client_env(nats),
        "SLLM_STORE_URL": str(store),
        "SLLM_TOKEN": TOKEN,
        "SLLM_POLICY": policy,
        "SLLM_WAKE_TIMEOUT": "120s",
        "SLLM_DRAM_CAPACITY": "256Mi",
        "SLLM_SSD_CAPACITY": "256Mi",
        "SLLM_CPU_SLOTS": "1",
        "SLLM_POOL_SIZE": "1",
        "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
        "SLLM_HEARTBEAT_INTERVAL": "0.3s",
    }


def _start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="package")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.node.main import dram_root
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint
    from sllm.settings import NodeSettings
    from tests.tiny_model import TinyConfig, build_tiny_llama

    root = tmp_path_factory.mktemp("migration-it")
    # Wider and deeper than the default tiny model, with a 2048 context: streams of a few
    # hundred tokens last seconds here (~10 ms a token), long enough to move one mid-way.
    config = TinyConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, max_position_embeddings=2048
    )
    model_dir = build_tiny_llama(root / "hf", seed=0, config=config)
    index = convert_checkpoint(model_dir, root / "ckpt")
    store = root / "store"
    store.mkdir()
    push_checkpoint(root / "ckpt", LocalStore(store), CHECKPOINT_KEY)
    nats = start_nats(root / "nats", credentials=NatsCredentials(root / "nats-creds"))
    env = stage_env(nats, store, "least-loaded")
    s = Stage(root, nats, env)
    node_envs = []
    try:
        for i in (1, 2):
            node_id = f"mig-{os.getpid()}-{i}"
            node_env = {
                **env,
                **nats_client_env(nats, node_id),
                "SLLM_NODE_ID": node_id,
                "SLLM_CACHE_DIR": str(root / f"c{i}"),
            }
            node_envs.append(node_env)
            argv = ["-v", "node", "start", "--drain", "2s"]
            s.nodes[node_id] = _start(argv, node_env, root / f"{node_id}.log")
        s.gateway = _start(
            ["gateway", "start"], {**env, "SLLM_GATEWAY_PORT": str(s.port)}, root / "gateway.log"
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{s.url}/healthz", timeout=2).json()
                if health.get("nodes") == 2:
                    break
            except (httpx.TransportError, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "nodes did not come up:\n" + s.logs()
            time.sleep(0.2)
        spec = {
            "name": FUNCTION,
            "model": "tiny",
            "handler": "chat",
            "auth": "public",
            "scale": {"min": 2, "max": 2, "keep_alive": "10m"},
            "generation": {"max_tokens": MAX_TOKENS, "temperature": 0.0},
        }
        body = {"spec": spec, "checkpoint": CHECKPOINT_KEY, "checkpoint_bytes": index.total_bytes}
        r = httpx.post(f"{s.url}/system/functions", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 201, r.text
        s.wait_ready(2)
        yield s
    finally:
        if s._http is not None:
            s._http.close()
        if s.gateway is not None:
            _stop(s.gateway)
        for proc in s.nodes.values():
            _stop(proc)
        nats.stop()
        for node_env in node_envs:
            shutil.rmtree(dram_root(NodeSettings.from_env(node_env)), ignore_errors=True)
