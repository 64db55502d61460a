"""`free_port`: a port for a server about to start, that no outgoing connection can take first."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_cli import servers


def test_ports_come_from_outside_the_ephemeral_range_and_never_twice() -> None:
    low, high = servers.ephemeral_range()
    ports = [servers.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= p <= high for p in ports), [p for p in ports if low <= p <= high]


def test_a_port_that_is_bound_now_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    taken, spare = servers.free_port(), servers.free_port()
    servers._handed_out.difference_update({taken, spare})  # as if another process chose them
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        draws: Iterator[int] = iter([taken, spare])
        monkeypatch.setattr(servers._rng, "randint", lambda a, b: next(draws))
        assert servers.free_port() == spare


def test_the_range_is_read_from_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ip_local_port_range"
    fake.write_text("20000\t30000\n")
    monkeypatch.setattr(servers, "EPHEMERAL_RANGE_FILE", fake)
    assert servers.ephemeral_range() == (20000, 30000)
    assert all(not 20000 <= servers.free_port() <= 30000 for _ in range(50))
    fake.write_text("garbage")
    assert servers.ephemeral_range() == (32768, 60999)
