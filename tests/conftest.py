"""Fixtures shared by every test layer: the real servers and the tiny models.

Servers are real processes on 127.0.0.1 (nats-server with JetStream, SeaweedFS's S3), started
once per session. Area-specific fixtures live in the conftest of each test folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.container.podman import Podman
from sllm.nats_auth import NatsCredentials
from sllm_cli.servers import ManagedServer, nats_client_env, start_nats, start_seaweedfs
from tests import secret_scan, workers
from tests.leaks import LeakCheck, free_dram_tiers

S3_KEY_ID = "sllm-test"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LeakCheck(), "sllm-leak-check")
    config.pluginmanager.register(secret_scan.SecretScan(), "sllm-secret-scan")
    workers.register(config)


@pytest.fixture(scope="session", autouse=True)
def _free_test_nodes_dram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A node keeps its DRAM tier (shared memory) when it stops, by design: restarted, it finds
    its checkpoints there again. The nodes of this session ran on temporary cache directories,
    so no node will: free their tiers once every test is done."""
    yield
    free_dram_tiers(tmp_path_factory.getbasetemp())


S3_SECRET = "sllm-test-secret"
secret_scan.register(S3_SECRET)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    """NATS as the platform runs it: only known identities (NKeys) may connect, each limited to
    its role's subjects (sllm.nats_auth); ``nats_client_env`` gives a gateway's or a node's."""
    root = tmp_path_factory.mktemp("nats")
    creds = NatsCredentials(root / "creds")
    creds.gateway()
    server = start_nats(root, credentials=creds)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: ManagedServer) -> str:
    return f"nats://127.0.0.1:{nats_server.ports['client']}"


@pytest.fixture(scope="session")
def nats_seed(nats_server: ManagedServer) -> str:
    """The gateway role's seed file: tests that talk to nodes over NATS act as the gateway."""
    return nats_client_env(nats_server)["SLLM_NATS_SEED_FILE"]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    server: ManagedServer

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "SLLM_S3_ENDPOINT": self.endpoint,
            "SLLM_S3_REGION": "us-east-1",
            "SLLM_S3_PATH_STYLE": "true",
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def make_bucket(self, name: str) -> str:
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=name)
                return name
            except client.exceptions.BucketAlreadyOwnedByYou:
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on loopback with its own credentials."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = S3_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET
    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield S3Server(f"http://127.0.0.1:{server.ports['s3']}", S3_KEY_ID, S3_SECRET, server)
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama in Hugging Face layout (safetensors, tokenizer, chat template)."""
    from tests.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


# -- the container engine ------------------------------------------------------------------
# podman is installed from Debian's packages when it is missing and this is root with apt (a
# fresh CI machine; ~15 s); elsewhere the tests that need it are skipped, saying why. The base
# image's root file system (debootstrap, ~45 s to minutes) is kept in the XDG cache directory,
# and images are tagged by the digest of their inputs, so a second run builds only what changed.
TOOLS = ("podman", "runc", "debootstrap")


def install_engine() -> str | None:
    """Install podman, runc and debootstrap when missing; why not, or None when present."""
    if os.geteuid() != 0:
        return "the container backend and these tests need root (mounts, cgroups)"
    if all(shutil.which(tool) for tool in TOOLS):
        return None
    if shutil.which("apt-get") is None:
        return f"{', '.join(TOOLS)} are not installed and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", *TOOLS],
    ):
        done = subprocess.run(command, capture_output=True, env=env, timeout=900, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-500:]
            return f"could not install {', '.join(TOOLS)}: {' '.join(command)}: {tail}"
    return None


@pytest.fixture(scope="session")
def podman() -> Podman:
    problem = install_engine()
    if problem is not None:
        pytest.skip(problem)
    from runtime.container.podman import find_podman

    engine = find_podman()
    assert engine is not None
    return engine


@pytest.fixture(scope="session")
def image_cache() -> Path:
    from runtime.node.main import image_cache_dir

    return image_cache_dir()


@pytest.fixture(scope="session")
def runtime_image(podman: Podman, image_cache: Path) -> str:
    """This checkout's CPU runtime image (docker/runtime.Dockerfile on the local base)."""
    from runtime.container.images import ensure_runtime_image

    return ensure_runtime_image(podman, image_cache)
