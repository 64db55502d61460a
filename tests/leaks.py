"""The session leaves nothing behind: a check that fails the run otherwise.

At the start of the session it records what exists; at its end, after every fixture is torn
down, it looks for what the tests added and did not remove:

- processes: any descendant of the test process still alive. The test process is made a child
  subreaper (prctl), so an instance orphaned by a SIGKILLed node is reparented here and found;
- the platform's ``/dev/shm`` entries (node DRAM tiers, ``sllm-<uid>-...``) that did not exist
  at the start and belong to this session: a tier names its cache directory, and this
  session's lie under its temporary directory. Other programs' entries, and tiers of another
  test session running at the same time (a second checkout), are not this session's;
- open sockets of the test process;
- network namespaces (``sllm_cli.netns`` topologies) the test process made and did not remove.

Each leak is named in the report, removed (processes killed, entries deleted) so nothing
outlives the run, and the run fails. ``SLLM_LEAK_CHECK=0`` turns the check off (for a run that
is interrupted on purpose).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from runtime.node.main import OWNER_FILE
from tests import workers

SHM = Path("/dev/shm")
TIER_PREFIX = f"sllm-{os.getuid()}-"  # runtime.node.main.dram_root
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 5.0  # processes told to stop at teardown may still be exiting


@dataclass
class Baseline:
    shm: set[str] = field(default_factory=set)
    sockets: set[int] = field(default_factory=set)


def _sockets() -> set[int]:
    return {c.fd for c in psutil.Process().net_connections(kind="all") if c.fd >= 0}


def _alive_descendants() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)  # an orphan that exited: reap it
                continue
            alive.append(proc)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue
    return alive


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def start(baseline: Baseline) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    baseline.shm = set(os.listdir(SHM)) if SHM.is_dir() else set()
    baseline.sockets = _sockets()


def _ours(entry: Path, basetemp: Path) -> bool:
    """Whether a new /dev/shm entry belongs to this session: a node's DRAM tier names its cache
    directory (under this session's temporary directory); another session running at the same
    time (a second checkout's tests) has its own."""
    try:
        owner = (entry / OWNER_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return True
    return Path(owner).is_relative_to(basetemp)


def free_dram_tiers(basetemp: Path) -> None:
    """Remove the node DRAM tiers whose cache directory lies under ``basetemp``."""
    for entry in SHM.glob(TIER_PREFIX + "*"):
        if (entry / OWNER_FILE).is_file() and _ours(entry, basetemp.resolve()):
            shutil.rmtree(entry, ignore_errors=True)


def finish(baseline: Baseline, basetemp: Path) -> list[str]:
    """Find, report and remove what the session left behind."""
    problems: list[str] = []
    deadline = time.monotonic() + GRACE_S
    alive = _alive_descendants()
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive_descendants()
    for proc in alive:
        problems.append(f"process left running, {_describe(proc)}")
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    if SHM.is_dir():
        for name in sorted(set(os.listdir(SHM)) - baseline.shm):
            if not name.startswith(TIER_PREFIX) or not _ours(SHM / name, basetemp):
                continue
            problems.append(f"/dev/shm entry left: {name}")
            path = SHM / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    from sllm_cli import netns

    for tag in netns.tags_of(os.getpid()):
        problems.append(f"network topology left: {tag} ({', '.join(netns.namespaces(tag))})")
        netns.remove(tag)
    gc.collect()  # sockets held only by garbage are closed by collecting it
    for conn in psutil.Process().net_connections(kind="all"):
        if conn.fd >= 0 and conn.fd not in baseline.sockets:
            where = f"{conn.laddr} -> {conn.raddr}" if conn.raddr else f"{conn.laddr}"
            state = f" {conn.status}" if conn.status and conn.status != "NONE" else ""
            problems.append(f"socket left open: fd {conn.fd} {conn.type.name}{state} {where}")
    return problems


class LeakCheck:
    """The pytest plugin (registered by tests/conftest.py)."""

    def __init__(self) -> None:
        self.baseline = Baseline()
        self.enabled = os.environ.get("SLLM_LEAK_CHECK", "1") != "0"

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.enabled:
            start(self.baseline)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.enabled or session.config.option.collectonly:
            return
        basetemp = session.config._tmp_path_factory.getbasetemp().resolve()  # type: ignore[attr-defined]
        problems = finish(self.baseline, basetemp)
        if not problems:
            return
        lines = ("the test session left things behind:", *(f"  - {p}" for p in problems))
        workers.report(session, workers.Finding("leak check failed", lines, failed=True))
