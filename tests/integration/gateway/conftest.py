"""The gateway for real: its own nats-server (JetStream in a temp directory, so the registry
outlives a gateway restart and no other test's gateway shares the bucket), `sllm gateway start`
and `sllm node start` as child processes, and the tiny model converted and pushed into a
local-directory store."""

from __future__ import annotations

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

from sllm.nats_auth import NatsCredentials
from sllm_cli.servers import ManagedServer, free_port, nats_client_env, start_nats, stop_process
from tests import secret_scan

TOKEN = "it-token"
secret_scan.register(TOKEN)
AUTH = {"authorization": f"Bearer {TOKEN}"}
CHECKPOINT_KEY = "checkpoints/tiny/it-gateway"


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    stop_process(proc, timeout_s)


@dataclass
class Cluster:
    root: Path
    nats: ManagedServer
    env: dict[str, str]
    checkpoint_bytes: int
    node: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_gateway(self) -> None:
        env = {**self.env, "SLLM_GATEWAY_PORT": str(self.port)}
        with open(self.root / "gateway.log", "ab") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "sllm_cli.main", "gateway", "start"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.gateway.poll() is None, self.log_tail("gateway.log")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not start:\n" + self.log_tail(
                "gateway.log"
            )
            time.sleep(0.1)

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            _stop(self.gateway)
            self.gateway = None

    def wait_for_node(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{self.url}/healthz", timeout=5).json()["nodes"] < 1:
            assert self.node is not None and self.node.poll() is None, self.log_tail("node.log")
            assert time.monotonic() < deadline, "no node heartbeat:\n" + self.log_tail("node.log")
            time.sleep(0.1)

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.root / name
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-n:])

    def deploy(self, name: str, auth: str = "public", **scale: Any) -> dict[str, Any]:
        spec = {
            "name": name,
            "model": "tiny",
            "handler": "chat",
            "auth": auth,
            "scale": scale,
            "generation": {"max_tokens": 8, "temperature": 0.0},
        }
        body = {
            "spec": spec,
            "checkpoint": CHECKPOINT_KEY,
            "checkpoint_bytes": self.checkpoint_bytes,
        }
        r = httpx.post(f"{self.url}/system/functions", json=body, headers=AUTH, timeout=10)
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint

    root = tmp_path_factory.mktemp("gateway-it")
    index = convert_checkpoint(tiny_model_dir, root / "ckpt")
    store = root / "store"
    store.mkdir()
    push_checkpoint(root / "ckpt", LocalStore(store), CHECKPOINT_KEY)
    nats = start_nats(root / "nats", credentials=NatsCredentials(root / "nats-creds"))
    node_id = f"gw-it-{os.getpid()}"
    env = {
        **os.environ,
        **nats_client_env(nats),
        "SLLM_STORE_URL": str(store),
        "SLLM_TOKEN": TOKEN,
        "SLLM_POLICY": "least-loaded",
        "SLLM_SCALE_DOWN_WINDOW": "1s",
        "SLLM_WAKE_TIMEOUT": "120s",
        "SLLM_MAX_BODY_BYTES": "64Ki",
        "SLLM_NODE_ID": node_id,
        "SLLM_CACHE_DIR": str(root / "cache"),
        "SLLM_DRAM_CAPACITY": "256Mi",
        "SLLM_SSD_CAPACITY": "256Mi",
        "SLLM_CPU_SLOTS": "2",
        "SLLM_POOL_SIZE": "1",
        "SLLM_VLLM": "off",  # the transformers backend only: no vLLM process
        "SLLM_HEARTBEAT_INTERVAL": "0.3s",
    }
    c = Cluster(root, nats, env, index.total_bytes)
    with open(root / "node.log", "ab") as log:
        c.node = subprocess.Popen(
            [sys.executable, "-m", "sllm_cli.main", "-v", "node", "start", "--drain", "2s"],
            env={**env, **nats_client_env(nats, node_id)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        c.start_gateway()
        c.wait_for_node()
        yield c
    finally:
        c.stop_gateway()
        if c.node is not None:
            _stop(c.node)
        nats.stop()
        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)
