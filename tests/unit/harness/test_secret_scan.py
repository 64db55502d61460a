"""The session's secret scan (tests/secret_scan.py) finds secrets in log files by shape and by
value, and names where without printing them; clean logs pass."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm.instance_auth import new_secret
from sllm.nats_auth import NatsCredentials
from tests.secret_scan import known_secrets, scan


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Outside the session's base directory, which the session's own scan searches."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def test_finds_each_kind_of_secret_and_names_only_where(tmp_path: Path) -> None:
    creds = NatsCredentials(tmp_path / "creds")
    seed = creds.gateway().read_text().strip()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text("a-token-of-sllm-up-1234\n")
    instance = new_secret()
    logs = tmp_path / "run"
    logs.mkdir()
    (logs / "clean.log").write_text("INFO gateway started\nINFO key created id=0123456789ab\n")
    (logs / "node.log").write_text(f"ok\nloading with {instance}\n")
    (logs / "gateway.log").write_text(
        "x sllm_0123456789ab_" + "A" * 43 + "\nsaw a-token-of-sllm-up-1234 here\n"
    )
    (logs / "nats.log").write_text(f"connect {seed}\n")
    found = scan(tmp_path, known_secrets(tmp_path))
    assert found.files == 4
    assert sorted(found.problems) == sorted(
        [
            "run/node.log:2: instance secret",
            "run/gateway.log:1: invocation key",
            "run/gateway.log:2: known secret value",
            "run/nats.log:1: NATS seed",
            "run/nats.log:1: known secret value",
        ]
    )
    assert not any(instance in p or seed in p for p in found.problems)


def test_clean_logs_pass(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text(
        "public key UDR7TSODUX2YWCJ52M3B4HYFXTDKPTGK3VM2ZOR4RSUV7N5XAA7\n"
    )
    assert scan(tmp_path, known_secrets(tmp_path)).problems == []
