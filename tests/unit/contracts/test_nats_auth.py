"""NATS credentials on disk: one private seed per identity, a server config with public keys
only, each node's permissions naming its own subjects."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sllm.nats_auth import ROUTE_USER, NatsCredentials, public_key
from sllm_cli.main import main


def test_seeds_are_private_and_the_config_holds_public_keys_only(tmp_path: Path) -> None:
    creds = NatsCredentials(tmp_path / "creds")
    gateway, node = creds.gateway(), creds.node("n-1")
    assert creds.gateway() == gateway  # kept, not remade
    assert stat.S_IMODE(creds.directory.stat().st_mode) == 0o700
    seeds = [p.read_text().strip() for p in (gateway, node)]
    for path, seed in zip((gateway, node), seeds, strict=True):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and seed.startswith("SU")
    config = creds.config_path.read_text()
    assert all(seed not in config for seed in seeds)
    assert all(public_key(seed) in config for seed in seeds)
    assert '"sllm.node.n-1.heartbeat"' in config and '"sllm.node.n-1.cmd"' in config
    assert "allow_responses" in config


def test_sllm_nats_creds_adds_nodes(tmp_path: Path, capsys: object) -> None:
    assert main(["nats", "creds", str(tmp_path), "--node", "a"]) == 0
    first = (tmp_path / "gateway.nk").read_text()
    assert main(["nats", "creds", str(tmp_path), "--node", "b"]) == 0
    assert (tmp_path / "gateway.nk").read_text() == first
    assert {p.name for p in tmp_path.glob("*.nk")} == {"gateway.nk", "node-a.nk", "node-b.nk"}
    assert (tmp_path / "auth.conf").read_text().count("nkey:") == 3


def test_sllm_nats_creds_routes_writes_a_secret_cluster_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = "nats://nats-0:6222,nats://nats-1:6222"
    assert main(["nats", "creds", str(tmp_path), "--routes", routes]) == 0
    cluster = tmp_path / "cluster.conf"
    text = cluster.read_text()
    password = (tmp_path / "route.secret").read_text().strip()
    assert len(password) >= 40 and stat.S_IMODE(cluster.stat().st_mode) == 0o600
    assert 'include "auth.conf"' in text and '"0.0.0.0:6222"' in text
    assert f'user: "{ROUTE_USER}", password: "{password}"' in text
    for host in ("nats-0", "nats-1"):
        assert f'"nats://{ROUTE_USER}:{password}@{host}:6222"' in text
    assert password not in capsys.readouterr().out
    # kept on a second run, so members configured before and after agree
    assert main(["nats", "creds", str(tmp_path), "--routes", routes]) == 0
    assert (tmp_path / "route.secret").read_text().strip() == password


def test_sllm_nats_creds_refuses_bad_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nats", "creds", str(tmp_path / "c"), "--routes", "nats-0:6222"]) != 0
    assert "--routes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
