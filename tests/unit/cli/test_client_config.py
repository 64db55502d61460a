"""Where the CLI finds the gateway: flags > environment > config file > default."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sllm.errors import ValidationFailed
from sllm_cli.client import DEFAULT_URL, ClientConfig, config_path, write_config_file


def test_config_path_follows_home_and_xdg(tmp_path: Path) -> None:
    assert config_path({"HOME": str(tmp_path)}) == tmp_path / ".config/sllm/config.yaml"
    xdg = {"HOME": "/nowhere", "XDG_CONFIG_HOME": str(tmp_path / "x")}
    assert config_path(xdg) == tmp_path / "x/sllm/config.yaml"


def test_precedence_flags_env_file_default(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert ClientConfig.resolve(env=env) == ClientConfig(DEFAULT_URL, "")

    write_config_file(config_path(env), "http://file:1", "file-token")
    assert ClientConfig.resolve(env=env) == ClientConfig("http://file:1", "file-token")

    env |= {"SLLM_GATEWAY_URL": "http://env:2/", "SLLM_TOKEN": "env-token"}
    assert ClientConfig.resolve(env=env) == ClientConfig("http://env:2", "env-token")

    flags = ClientConfig.resolve(url="https://flag:3", token="flag-token", env=env)
    assert flags == ClientConfig("https://flag:3", "flag-token")


def test_config_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "config.yaml"
    write_config_file(path, "http://127.0.0.1:8080", "secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_config_file(path, "http://127.0.0.1:9090", "secret2")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg-parent"), "HOME": str(tmp_path)}
    (tmp_path / "cfg-parent" / "sllm").mkdir(parents=True)
    path.replace(tmp_path / "cfg-parent" / "sllm" / "config.yaml")
    assert ClientConfig.resolve(env=env) == ClientConfig("http://127.0.0.1:9090", "secret2")


def test_url_without_scheme_is_rejected() -> None:
    with pytest.raises(ValidationFailed, match="must start with http"):
        ClientConfig.resolve(url="localhost:8080", env={})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("gateway_url: [1, 2]\n", "gateway_url must be a string"),
        ("- a\n", "expected a mapping"),
        ("gateway_url: 'x\n", "not valid YAML"),
    ],
)
def test_bad_config_file_names_the_file(tmp_path: Path, text: str, problem: str) -> None:
    env = {"HOME": str(tmp_path)}
    path = config_path(env)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValidationFailed, match=problem) as info:
        ClientConfig.resolve(env=env)
    assert str(path) in info.value.message


def test_key_precedence_and_kept_by_sllm_up(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    path = config_path(env)
    path.parent.mkdir(parents=True)
    path.write_text("gateway_url: http://file:1\ntoken: t\nkey: file-key\n")
    assert ClientConfig.resolve(env=env).key == "file-key"
    # `sllm up` rewrites URL and token; the user's key stays
    write_config_file(path, "http://127.0.0.1:8080", "t2")
    assert ClientConfig.resolve(env=env) == ClientConfig("http://127.0.0.1:8080", "t2", "file-key")
    assert ClientConfig.resolve(env=env | {"SLLM_KEY": "env-key"}).key == "env-key"
    assert ClientConfig.resolve(env=env | {"SLLM_KEY": "env-key"}, key="flag").key == "flag"
    # secrets stay out of reprs (a config printed in a traceback or a log line)
    assert "t2" not in repr(ClientConfig.resolve(env=env))
    assert "file-key" not in repr(ClientConfig.resolve(env=env))
