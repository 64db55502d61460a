"""Issue 14 under `sllm up`, as a user runs it: a crashed node, nats-server or gateway is
restarted by `sllm up` (which keeps running) and the platform keeps its state; a redeploy with
a changed chat template reaches the instances (a broken config.json failing the deploy is
tests/integration/cli/test_deploy_pipeline.py's).

Faults are injected by pid (SIGKILL of the child `sllm up` started), never by a timer."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .conftest import Cli, Up

pytestmark = pytest.mark.e2e

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
        "temperature": 0}  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def child(platform: Up, needle: str) -> psutil.Process:
    """The child of `sllm up` whose command line contains ``needle``."""
    assert platform.process is not None
    for proc in psutil.Process(platform.process.pid).children():
        if needle in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no child of sllm up runs {needle!r}")


def kill(platform: Up, needle: str) -> int:
    proc = child(platform, needle)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return proc.pid


def restarted(platform: Up, name: str, old_pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while f"{name} restarted" not in platform.text():
        assert time.monotonic() < deadline, platform.text()[-3000:]
        time.sleep(0.1)
    assert platform.process is not None and platform.process.poll() is None


def chat(platform: Up, name: str, timeout_s: float = 180.0) -> dict[str, Any]:
    r = httpx.post(f"{platform.url}/function/{name}", json=CHAT, timeout=timeout_s)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    answer.pop("id", None)  # the rest is the same for the same greedy request
    return answer


@pytest.fixture(scope="module")
def tiny(cli: Cli, tiny_model_dir: Path) -> str:
    ok(cli("fn", "new", "tiny", "--template", "llm-chat", "--model", str(tiny_model_dir)))
    spec = cli.cwd / "tiny" / "function.yaml"  # public: these clients send no invocation key
    spec.write_text(spec.read_text().replace("auth: private", "auth: public"))
    assert "auth: public" in spec.read_text()
    ok(cli("fn", "deploy", "-f", "tiny"))
    return "tiny"


def test_a_killed_node_is_restarted_and_serves_again(platform: Up, tiny: str) -> None:
    before = chat(platform, tiny)
    pid = kill(platform, "node start")
    restarted(platform, "node", pid)
    assert "node exited (code -9)" in platform.text()
    assert chat(platform, tiny) == before  # same greedy answer from a new instance


def test_a_killed_nats_server_is_restarted_and_the_registry_kept(
    platform: Up, tiny: str, cli: Cli
) -> None:
    before = chat(platform, tiny)
    pid = kill(platform, "nats-server")
    assert chat(platform, tiny, timeout_s=30) == before  # the instance serves on meanwhile
    restarted(platform, "nats-server", pid)
    listed = json.loads(ok(cli("fn", "list", "--json")).stdout)
    assert [f["name"] for f in listed] == [tiny]
    ok(cli("fn", "scale", tiny, "1"))  # an admin write works again once NATS is back


def test_a_killed_gateway_is_restarted_and_finds_the_running_instance(
    platform: Up, tiny: str, cli: Cli
) -> None:
    before = chat(platform, tiny)
    # The instance the killed node of the first test left may still be listed: an orphan
    # that drains on its own, which the gateway drops at the restarted node's first heartbeat
    # (and a replacement may still be starting). Wait for the one instance scale 1 keeps.
    deadline = time.monotonic() + 60
    while True:
        running = json.loads(ok(cli("fn", "describe", tiny, "--json")).stdout)["instances"]
        if [i["state"] for i in running] == ["ready"]:
            break
        assert time.monotonic() < deadline, f"instances do not settle: {running}"
        time.sleep(0.5)
    pid = kill(platform, "gateway start")
    restarted(platform, "gateway", pid)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{platform.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the restarted gateway does not answer"
        time.sleep(0.2)
    assert chat(platform, tiny) == before
    after = json.loads(ok(cli("fn", "describe", tiny, "--json")).stdout)["instances"]
    assert [i["id"] for i in after] == [i["id"] for i in running]  # adopted, not restarted


def test_a_changed_chat_template_reaches_the_instances(
    platform: Up, tiny: str, cli: Cli, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # bug 2: the store key covered only the weights, so this redeploy changed nothing
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    folder = cli.cwd / tiny / "function.yaml"
    folder.write_text(folder.read_text().replace(str(tiny_model_dir), str(model)))
    ok(cli("fn", "deploy", "-f", tiny))
    before = chat(platform, tiny)["usage"]["prompt_tokens"]
    template = model / "chat_template.jinja"
    template.write_text("<|system|>You answer briefly.<|end|>" + template.read_text())
    redeployed = ok(cli("fn", "deploy", "-f", tiny))
    assert "uploaded to" in redeployed.stderr
    deadline = time.monotonic() + 120
    while chat(platform, tiny)["usage"]["prompt_tokens"] == before:
        assert time.monotonic() < deadline, "the new chat template never reached an instance"
        time.sleep(0.5)
