"""docker/: the compose file validates with the docker CLI (when a compose client is
installed; no engine is needed) and wires the four services the way the platform expects."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sllm.settings import as_nats_urls

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker" / "compose.yaml"


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin), else the standalone `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    expected = {"nats-0", "nats-1", "nats-2", "s3", "gateway-0", "gateway-1", "runtime"}
    assert expected <= set(rendered["services"])


def test_services_are_wired_together() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    nats = ["nats-0", "nats-1", "nats-2"]
    for role in ("gateway-0", "gateway-1", "runtime"):
        service = services[role]
        dockerfile = REPO / "docker" / Path(service["build"]["dockerfile"]).name
        assert dockerfile.is_file(), dockerfile
        assert (REPO / "docker" / service["build"]["context"]).resolve() == REPO
        env = service["environment"]
        assert as_nats_urls(env["SLLM_NATS_URL"]) == tuple(f"nats://{n}:4222" for n in nats)
        assert env["SLLM_NATS_REPLICAS"] == "3"
        assert env["SLLM_STORE_URL"].startswith("s3://")
        assert env["SLLM_S3_ENDPOINT"] == "http://s3:9000"
        assert set(service["depends_on"]) == {*nats, "s3-init"}
    # both gateways published, on different host ports
    ports = {services[g]["ports"][0] for g in ("gateway-0", "gateway-1")}
    assert len(ports) == 2
    for i, name in enumerate(nats):
        command = services[name]["command"]
        assert "-js" in command and command[command.index("--name") + 1] == f"nats-{i}"
        # the cluster (routes, their password) and the authorization come from secrets; a
        # --cluster or --routes flag would override them (a --cluster URL without a user even
        # clears the route password: nats-server's overrideCluster)
        assert command[-2:] == ["-c", "/run/secrets/cluster.conf"]
        assert not {"--cluster", "--routes"} & set(command)
        assert services[name]["secrets"] == [
            {"source": "nats-auth", "target": "auth.conf"},
            {"source": "nats-cluster", "target": "cluster.conf"},
        ]
    assert compose["secrets"]["nats-auth"]["file"] == "./secrets/auth.conf"
    assert compose["secrets"]["nats-cluster"]["file"] == "./secrets/cluster.conf"
    roles = (("gateway-0", "nats-gateway"), ("gateway-1", "nats-gateway"))
    for role, secret in (*roles, ("runtime", "nats-node-0")):
        service = services[role]
        assert service["secrets"] == [secret]
        assert service["environment"]["SLLM_NATS_SEED_FILE"] == f"/run/secrets/{secret}"
    node_id = services["runtime"]["environment"]["SLLM_NODE_ID"]
    assert compose["secrets"]["nats-node-0"]["file"] == f"./secrets/node-{node_id}.nk"
    devices = services["runtime"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_gateway_image_has_no_torch_and_runtime_image_is_cuda() -> None:
    gateway = (REPO / "docker" / "gateway.Dockerfile").read_text()
    install_lines = [line for line in gateway.splitlines() if "pip install" in line]
    assert install_lines and all("torch" not in line for line in install_lines)
    assert "-c requirements.lock" in gateway and "--extra server" in gateway
    assert "--extra runtime" not in gateway
    runtime = (REPO / "docker" / "runtime.Dockerfile").read_text()
    # GPU nodes by default: the CUDA lock (torch's CUDA libraries are wheels in it), on a base
    # with the Python both locks are resolved for; CPU builds pass build args
    assert "ARG BASE_IMAGE=python:3.11-slim" in runtime
    assert "ARG LOCK=requirements-cuda.lock" in runtime and "ARG EXTRAS=runtime" in runtime
    cuda_lock = (REPO / "requirements-cuda.lock").read_text()
    assert "--python-version 3.11" in (REPO / "Makefile").read_text()
    assert "\nnvidia-cuda-runtime==" in cuda_lock and "\ntorch==" in cuda_lock
    # The base extra of pyproject.toml (what the gateway image installs) must not pull torch.
    pyproject = (REPO / "pyproject.toml").read_text()
    base = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in base and "transformers" not in base
