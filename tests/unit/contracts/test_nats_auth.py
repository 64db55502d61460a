"""NATS credentials on disk: one private seed per identity, a server config with public keys
only, each node's permissions naming its own subjects."""

from __future__ import annotations

import stat
from pathlib import Path

from sllm.cli.main import main
from sllm.nats_auth import NatsCredentials, public_key


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
