"""`sllm up` on a machine with a container engine runs each instance in a container, and
`sllm fn deploy` of a python-handler function needing a package the node does not have builds
the function's image; the function answers (issue 19's acceptance path)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.container.images import function_image_name
from runtime.container.podman import ContainerError, Podman
from sllm_cli.servers import free_port

from .conftest import Cli, Up, user_env

# 1200 s: the first test also waits for the session's images (a fresh machine: minutes)
pytestmark = [pytest.mark.e2e, pytest.mark.containers, pytest.mark.timeout(1200)]

HANDLER = """
import roman


def handle(request, ctx):
    result = ctx.generate(prompt=str(request["prompt"]), max_tokens=3, temperature=0)
    return {"tokens": roman.toRoman(result["usage"]["completion_tokens"])}
"""


@pytest.fixture(scope="module")
def container_platform(
    podman: Podman, runtime_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Up]:
    root = tmp_path_factory.mktemp("cuser")
    (root / "home").mkdir()
    up = Up(user_env(root / "home", root / "sllm-home"), free_port(), instances="auto")
    up.start()
    yield up
    up.stop()


def test_deploy_with_an_extra_requirement_builds_its_image_and_answers(
    container_platform: Up,
    tiny_model_dir: Path,
    tmp_path: Path,
    podman: Podman,
    runtime_image: str,
) -> None:
    cli = Cli(container_platform.env, tmp_path)
    node_log = Path(container_platform.env["SLLM_HOME"]) / "logs" / "node.log"
    # auto picked containers: the node's pre-started instance is one (started just after the
    # node's first heartbeat)
    deadline = time.monotonic() + 60
    while True:
        pool = podman.run("ps", "-a", "--format", "{{.Image}}", "--filter", "name=^sllm-node-0-")
        if "localhost/sllm-runtime" in pool.stdout.decode():
            break
        assert time.monotonic() < deadline, "no instance container"
        time.sleep(0.5)
    new = cli("fn", "new", "counted", "-t", "python-handler", "--model", str(tiny_model_dir))
    assert new.returncode == 0, new.stderr
    (tmp_path / "counted" / "handler.py").write_text(HANDLER)
    with open(tmp_path / "counted" / "requirements.txt", "a") as f:
        # not in the lock, the node's venv or the runtime image
        f.write("roman==5.2\n")
    lock = (Path(__file__).resolve().parents[3] / "requirements.lock").read_text()
    assert "\nroman==" not in lock and importlib.util.find_spec("roman") is None
    requirements = (tmp_path / "counted" / "requirements.txt").read_text()
    image = function_image_name(podman, runtime_image, requirements)
    with contextlib.suppress(ContainerError):  # built by an earlier run: build it again
        podman.run("rmi", "-f", image)
    deployed = cli("fn", "deploy", "-f", "counted")
    assert deployed.returncode == 0, deployed.stderr
    # the deploy (not a request) makes the node build the function's image
    deadline = time.monotonic() + 240
    while podman.image_id(image) is None:
        assert time.monotonic() < deadline, "the deploy did not build the function's image"
        time.sleep(0.5)
    answer = cli("fn", "invoke", "counted", "--json", "--no-stream", input='{"prompt": "hi"}')
    assert answer.returncode == 0, answer.stderr + node_log.read_text()[-3000:]
    assert json.loads(answer.stdout) == {"tokens": "III"}
