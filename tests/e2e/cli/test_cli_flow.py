"""A user's session: `sllm up`, then create, deploy, invoke, inspect, update and remove
functions with the CLI (subprocesses only), then restart `sllm up` on the same home."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import SLLM, Cli, Up, user_env

pytestmark = pytest.mark.e2e

QUESTION = "Hello there"


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def token_of(sllm_home: Path) -> str:
    return (sllm_home / "token").read_text().strip()


def test_up_prints_url_and_token_and_writes_the_config(
    platform: Up, user: tuple[Path, Path]
) -> None:
    home, sllm_home = user
    token = token_of(sllm_home)
    assert platform.url in platform.text() and token in platform.text()
    config = yaml.safe_load((home / ".config" / "sllm" / "config.yaml").read_text())
    assert config == {"gateway_url": platform.url, "token": token}
    assert (sllm_home / "nats").is_dir() and (sllm_home / "logs" / "gateway.log").is_file()


def test_a_second_up_is_refused_clearly(
    platform: Up, user: tuple[Path, Path], tmp_path: Path
) -> None:
    from sllm_cli.servers import free_port

    same_home = subprocess.run(
        [SLLM, "up", "--port", str(free_port())], env=platform.env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert same_home.returncode == 1 and "already running" in same_home.stderr
    same_port = subprocess.run(
        [SLLM, "up", "--port", str(platform.port)],
        env=user_env(user[0], tmp_path / "other-home"), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert same_port.returncode == 1 and "already in use" in same_port.stderr


def test_nodes_and_templates(cli: Cli) -> None:
    assert "node-0" in ok(cli("nodes")).stdout
    out = ok(cli("template", "list")).stdout
    assert all(t in out for t in ("llm-chat", "llm-completion", "python-handler"))


def test_new_deploy_list_invoke_describe(cli: Cli, platform: Up, tiny_model_dir: Path) -> None:
    ok(cli("fn", "new", "tiny-chat", "--template", "llm-chat", "--model", str(tiny_model_dir)))
    deployed = ok(cli("fn", "deploy", "-f", "tiny-chat"))
    assert "deployed tiny-chat (revision 1)" in deployed.stdout
    assert "uploaded to" in deployed.stderr

    listed = ok(cli("fn", "list")).stdout
    assert "tiny-chat" in listed and "chat" in listed

    streamed = ok(
        cli("fn", "invoke", "tiny-chat", "--max-tokens", "8", "--temperature", "0", input=QUESTION)
    ).stdout
    # The CLI's streamed answer is the whole answer: compare with a non-streamed request
    # straight to the gateway (greedy decoding is deterministic). The template's function is
    # private: the CLI sent the admin token; a plain client needs an invocation key.
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": False,
    }
    url = f"{platform.url}/function/tiny-chat"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    key = json.loads(
        ok(cli("key", "create", "--name", "e2e", "--function", "tiny-chat", "--json")).stdout
    )
    assert key["functions"] == ["tiny-chat"] and key["key"].startswith("sllm_")
    assert key["id"] in ok(cli("key", "list")).stdout
    auth = {"authorization": f"Bearer {key['key']}"}
    whole = httpx.post(url, json=body, headers=auth, timeout=120)
    assert whole.status_code == 200, whole.text
    as_json = ok(
        cli("fn", "invoke", "tiny-chat", "--json", "--key", key["key"], input=json.dumps(body))
    )
    assert json.loads(as_json.stdout)["text"] == whole.json()["text"]
    ok(cli("key", "revoke", key["id"]))
    assert httpx.post(url, json=body, headers=auth, timeout=30).status_code == 401
    text = whole.json()["text"]
    assert text and streamed == text + ("" if text.endswith("\n") else "\n")

    described = ok(cli("fn", "describe", "tiny-chat")).stdout
    assert "Replicas:    1 ready" in described and "node-0" in described
    # The heartbeat after the load reports where the checkpoint is cached.
    deadline = time.monotonic() + 20
    cache: list[dict[str, object]] = []
    while time.monotonic() < deadline and not cache:
        cache = json.loads(ok(cli("fn", "describe", "tiny-chat", "--json")).stdout)["cache"]
        time.sleep(0.5)
    assert cache and cache[0]["node"] == "node-0"
    assert "Checkpoint cached on:" in ok(cli("fn", "describe", "tiny-chat")).stdout
    # The instance's own log lines reach the gateway's ring buffer over NATS.
    logs = ok(cli("fn", "logs", "tiny-chat", "--tail", "50")).stdout
    assert "[node-0/tiny-chat-" in logs


def test_redeploy_updates_in_place_without_converting_again(cli: Cli) -> None:
    again = ok(cli("fn", "deploy", "-f", "tiny-chat/function.yaml"))
    assert "deployed tiny-chat (revision 2)" in again.stdout
    assert "already in" in again.stderr and "converting" not in again.stderr
    assert "scaling tiny-chat to 1" in ok(cli("fn", "scale", "tiny-chat", "1")).stdout


def test_custom_handler_function(cli: Cli, tiny_model_dir: Path) -> None:
    ok(cli("fn", "new", "tiny-hooks", "-t", "python-handler", "--model", str(tiny_model_dir)))
    ok(cli("fn", "deploy", "-f", "tiny-hooks"))
    request = {"question": "What is up?", "max_tokens": 4, "temperature": 0}
    answer = json.loads(ok(cli("fn", "invoke", "tiny-hooks", "--json", "--no-stream",
                               input=json.dumps(request))).stdout)  # fmt: skip
    assert isinstance(answer["answer"], str)
    assert 0 < answer["usage"]["completion_tokens"] <= 4
    streamed = ok(cli("fn", "invoke", "tiny-hooks", "-d", "Hi", "--max-tokens", "3"))
    assert streamed.stdout.endswith("\n")
    refused = cli("fn", "invoke", "tiny-hooks", "--json", input="{}")
    assert refused.returncode == 1 and 'send {"question"' in refused.stderr


def test_remove(cli: Cli) -> None:
    assert "removed tiny-hooks" in ok(cli("fn", "remove", "tiny-hooks")).stdout
    assert "tiny-hooks" not in ok(cli("fn", "list")).stdout
    gone = cli("fn", "describe", "tiny-hooks")
    one_line_error(gone, "tiny-hooks")


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("sllm: error: ") and result.stderr.count("\n") == 1
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def write_yaml(cli: Cli, folder: str, text: str) -> str:
    (cli.cwd / folder).mkdir(exist_ok=True)
    (cli.cwd / folder / "function.yaml").write_text(text)
    return folder


def test_bad_input(cli: Cli, tiny_model_dir: Path) -> None:
    from sllm_cli.servers import free_port

    one_line_error(cli("fn", "new", "Bad_Name"), "'Bad_Name' is not a DNS-1123 label")
    one_line_error(cli("fn", "new", "fine", "--template", "nope"), "template 'nope' does not exist")
    model = f"model: {tiny_model_dir}\n"
    unknown = write_yaml(cli, "unknown-key", f"name: a\n{model}scale:\n  mni: 1\n")
    one_line_error(cli("fn", "deploy", "-f", unknown), "scale.mni (line 4): unknown key")
    typed = write_yaml(cli, "ill-typed", f"name: a\n{model}generation:\n  temperature: hot\n")
    one_line_error(cli("fn", "deploy", "-f", typed), "generation.temperature (line 4)")
    bad_name = write_yaml(cli, "bad-name", f"name: Not_OK\n{model}")
    one_line_error(cli("fn", "deploy", "-f", bad_name), "name (line 1)", "DNS-1123")
    missing = write_yaml(cli, "missing-model", "name: a\nmodel: ./no/such/model\n")
    one_line_error(cli("fn", "deploy", "-f", missing), "'./no/such/model' does not exist")
    one_line_error(cli("fn", "deploy", "-f", "no-such-folder"), "no such file")
    one_line_error(
        cli("fn", "list", "--url", f"http://127.0.0.1:{free_port()}"),
        "no gateway is answering",
        "sllm up",
    )
    one_line_error(cli("fn", "list", "--token", "wrong"), "rejected the token")
    one_line_error(cli("fn", "invoke", "nobody", input="hi"), "nobody")
    one_line_error(cli("fn", "scale", "tiny-chat", "99"), "scale.max")


def test_restart_reuses_registry_store_and_caches(
    platform: Up, cli: Cli, user: tuple[Path, Path]
) -> None:
    token = token_of(user[1])
    assert platform.stop() == 0
    assert "stopped" in platform.text()
    not_running = cli("fn", "list")
    one_line_error(not_running, "no gateway is answering")

    platform.start()
    assert token_of(user[1]) == token and token in platform.text()
    assert "tiny-chat" in ok(cli("fn", "list")).stdout
    # The node's SSD cache survived: its first heartbeat already lists the checkpoint.
    key = json.loads(ok(cli("fn", "describe", "tiny-chat", "--json")).stdout)["checkpoint"]
    nodes = json.loads(ok(cli("nodes", "--json")).stdout)
    assert key in [entry["checkpoint"] for entry in nodes[0]["cache"]["ssd"]]
    again = ok(cli("fn", "deploy", "-f", "tiny-chat"))
    assert "revision 3" in again.stdout and "already in" in again.stderr
    assert "converting" not in again.stderr
    assert ok(cli("fn", "invoke", "tiny-chat", "--max-tokens", "2", input="hi")).stdout
