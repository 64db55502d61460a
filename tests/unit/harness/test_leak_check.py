"""The session leak check (tests/leaks.py) fails a run that leaves a process, a /dev/shm entry
of its own or a socket behind, names each, and removes them; a clean run passes. Each case
runs pytest in a subprocess, so the check sees only what that run did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests import inner_session

CONFTEST = """
from tests.leaks import LeakCheck

def pytest_configure(config):
    config.pluginmanager.register(LeakCheck(), "sllm-leak-check")
"""


def run_session(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    return inner_session.run_session(tmp_path, CONFTEST, {"test_case.py": body})


def test_a_clean_session_passes(tmp_path: Path) -> None:
    result = run_session(
        tmp_path,
        """
        import socket, subprocess
        def test_tidy():
            proc = subprocess.Popen(["sleep", "30"])
            proc.kill(); proc.wait()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0)); s.listen()
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leak check failed" not in result.stdout


def test_leaks_fail_the_session_are_named_and_removed(tmp_path: Path) -> None:
    shm = Path("/dev/shm") / f"sllm-{os.getuid()}-leak-check-{os.getpid()}"
    # durations unique to this run: another checkout's tests may run this test at the same time
    first, second = f"300.{os.getpid()}", f"301.{os.getpid()}"
    result = run_session(
        tmp_path,
        f"""
        import socket, subprocess
        from pathlib import Path
        KEEP = []
        def test_passes_but_leaves_things(tmp_path):
            KEEP.append(subprocess.Popen(["sleep", "{first}"]))
            # an orphan: its parent exits at once, so only the subreaper can still find it
            subprocess.run(["sh", "-c", "sleep {second} &"], check=True)
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); KEEP.append(s)
            shm = Path("{shm}"); shm.mkdir()
            # the cache directory exists: a node started meanwhile by another session would
            # sweep a tier whose directory is gone as an orphan
            (tmp_path / "cache").mkdir()
            (shm / "cache-dir").write_text(str(tmp_path / "cache"))
        """,
    )
    try:
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert "1 passed" in out and "leak check failed" in out, out
        assert "process left running" in out, out
        assert f"sleep {first}" in out and f"sleep {second}" in out, out
        assert f"/dev/shm entry left: {shm.name}" in out, out
        assert "socket left open" in out and "LISTEN" in out, out
        assert not shm.exists()
        sleepers = [p for p in psutil.process_iter(["cmdline", "status"]) if p.info["cmdline"] in
                    (["sleep", first], ["sleep", second])]  # fmt: skip
        assert sleepers == [], out
    finally:
        if shm.exists():
            import shutil

            shutil.rmtree(shm)


def test_other_sessions_and_programs_shm_entries_are_not_touched(tmp_path: Path) -> None:
    """A DRAM tier whose cache directory is outside this session's temporary directory belongs
    to another run (a second checkout's tests at the same time), and an entry not named like a
    tier to another program (podman's libpod_lock, a benchmark's buffer): neither is reported
    or removed."""
    tier = Path("/dev/shm") / f"sllm-{os.getuid()}-leak-other-{os.getpid()}"
    foreign = Path("/dev/shm") / f"not-sllm-leak-check-{os.getpid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # exists: a node starting meanwhile sweeps only tiers whose dir is gone
    try:
        result = run_session(
            tmp_path,
            f"""
            from pathlib import Path
            def test_someone_else_starts_a_node():
                tier = Path("{tier}"); tier.mkdir()
                (tier / "cache-dir").write_text("{elsewhere}")
                Path("{foreign}").write_bytes(b"x")
            """,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert tier.exists() and foreign.exists()
    finally:
        import shutil

        shutil.rmtree(tier, ignore_errors=True)
        foreign.unlink(missing_ok=True)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the check uses Linux's prctl and /dev/shm")
