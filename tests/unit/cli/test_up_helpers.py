"""`sllm up`'s pieces that need no servers: the kept token, the one-per-home lock, the
children's environment, a child that dies while being waited for."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from sllm.errors import Conflict, Unavailable
from sllm.settings import GatewaySettings, NodeSettings
from sllm_cli import supervisor, up


def test_token_is_created_once_and_kept_private(tmp_path: Path) -> None:
    first = up.load_or_create_token(tmp_path)
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert up.load_or_create_token(tmp_path) == first


def test_one_up_per_home(tmp_path: Path) -> None:
    with (
        up.home_lock(tmp_path),
        pytest.raises(Conflict, match="already running"),
        up.home_lock(tmp_path),
    ):
        pass
    with up.home_lock(tmp_path):  # released: a later `sllm up` may start
        pass


def test_children_read_their_settings_from_the_env(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "SLLM_GATEWAY_URL": "http://elsewhere:1", "SLLM_STORE_URL": ""}
    env = up.child_env(base, tmp_path, "nats://127.0.0.1:4333", 18080, "tok", cpu_slots=3)
    assert "SLLM_GATEWAY_URL" not in env and env["PATH"] == "/bin"
    gateway = GatewaySettings.from_env(env)
    assert (gateway.port, gateway.token, gateway.host) == (18080, "tok", "127.0.0.1")
    assert gateway.nats_urls == ("nats://127.0.0.1:4333",)
    assert gateway.store.url == str(tmp_path / "store")
    node = NodeSettings.from_env(env)
    assert node.cpu_slots == 3 and node.cache_dir == tmp_path / "cache" / "node-0"
    assert node.store.url == gateway.store.url
    # An explicit store (e.g. S3) is kept.
    s3 = up.child_env({"SLLM_STORE_URL": "s3://b/p"}, tmp_path, "nats://x:1", 1, "t", None)
    assert s3["SLLM_STORE_URL"] == "s3://b/p" and "SLLM_CPU_SLOTS" not in s3
    assert gateway.nats_replicas == 1


def test_ha_children_get_every_nats_server_and_three_replicas(tmp_path: Path) -> None:
    urls = "nats://127.0.0.1:1,nats://127.0.0.1:2,nats://127.0.0.1:3"
    env = up.child_env({}, tmp_path, urls, 18080, "tok", None, nats_replicas=3)
    gateway = GatewaySettings.from_env(env)
    assert len(gateway.nats_urls) == 3 and gateway.nats_replicas == 3
    assert NodeSettings.from_env(env).nats_urls == gateway.nats_urls


def test_a_child_dying_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    import subprocess

    from sllm_cli.servers import ManagedServer

    log = tmp_path / "child.log"
    log.write_text("boom: port taken\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    child = ManagedServer("gateway", proc, log)
    with pytest.raises(Unavailable, match="gateway exited") as info:
        up.wait_until("the gateway's /healthz", lambda: False, [child], timeout_s=5)
    assert "boom: port taken" in info.value.message


def test_waiting_times_out_with_what_it_waited_for() -> None:
    with pytest.raises(Unavailable, match="timed out after 0s waiting for a node heartbeat"):
        up.wait_until("a node heartbeat", lambda: False, [], timeout_s=0.3)


def test_restart_backoff_doubles_and_gives_up_on_a_crash_loop() -> None:
    assert [supervisor.restart_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert supervisor.restart_delay(supervisor.CRASH_LOOP) is None


def test_supervise_restarts_a_dead_child_and_gives_up_on_a_crash_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # issue 14: one crashed child stopped the whole platform; now it is restarted with
    # backoff, and only a child that keeps dying right after its start ends `sllm up`
    import subprocess

    from sllm_cli.servers import ManagedServer

    log = tmp_path / "node.log"
    log.write_text("node: out of memory\n")
    started: list[int] = []

    def crashing() -> ManagedServer:
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
        proc.wait()
        started.append(proc.pid)
        return ManagedServer("node", proc, log)

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    platform = up.Platform("http://127.0.0.1:1", "t", tmp_path, [crashing()], {"node": crashing})
    assert (
        supervisor.supervise(platform.servers, platform.starters, clock=lambda: now[0], sleep=sleep)
        == 1
    )
    err = capsys.readouterr().err
    assert len(started) == supervisor.CRASH_LOOP  # the first start and 5 restarts
    assert err.count("restarting it in") == supervisor.CRASH_LOOP - 1
    assert "node exited (code 9) after 0.0s; restarting it in 0.5s" in err
    assert "restarting it in 8s" in err and "keeps crashing" in err and "out of memory" in err


def test_sigterm_during_a_restart_stops_the_platform(tmp_path: Path) -> None:
    """A SIGTERM that arrives while a child is being started again (a NATS member waits until
    it is healthy) ends `sllm up`; it was taken for a failed start, and `sllm up` went on."""
    import subprocess

    from sllm_cli.servers import ManagedServer

    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(9)"])
    dead.wait()

    def interrupted() -> ManagedServer:
        up._on_sigterm(15, None)  # the signal lands inside the start
        raise AssertionError("unreachable")

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    log = tmp_path / "nats.log"
    log.write_text("")
    servers = [ManagedServer("nats-1", dead, log)]
    platform = up.Platform("http://127.0.0.1:1", "t", tmp_path, servers, {"nats-1": interrupted})
    with pytest.raises(up._Stop):
        supervisor.supervise(platform.servers, platform.starters, clock=lambda: now[0], sleep=sleep)
