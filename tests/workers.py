"""The suite on several workers (pytest-xdist; `make test` runs two, ``-n 2 --dist loadgroup``).

Most of the suite waits on servers and subprocesses: one pytest process kept a 2-core machine
about 35 % idle (vmstat over a full run). Two things make the split safe and cheap:

- **Work units** (``xdist_group`` marks, given at collection): a test goes where the fixture
  instances it shares with other tests live. A module is one unit, so a module's platform or
  vLLM engine is built once, and its tests run in their order. Tests that share a package- or
  session-scoped fixture from a conftest below ``tests/`` (the migration stage, the HA
  platform, a converted checkpoint) are one unit, named after that conftest's directory. Every
  test that needs podman is one unit: they share the image cache, and two workers would build
  the same image at once. The session fixtures of ``tests/conftest.py`` (NATS, S3, the tiny
  model) are cheap: each worker makes its own. (pytest is capped below 9.2, where xdist 3.8
  silently ignores these marks: pyproject.toml.)
- **Session-end checks** (``tests/leaks.py``, ``tests/secret_scan.py``) run in every worker,
  on what that worker did. A worker cannot fail the run by itself (xdist reads its exit status
  before these checks), so it hands its findings to the controller, which reports them and
  fails the run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CONTAINERS = "containers"
_FINDINGS = "sllm_session_checks"  # the key in a worker's output to the controller
_WIDE_SCOPES = ("package", "session")


def work_unit(item: pytest.Item, roots: set[Path]) -> str:
    """The group ``item`` runs in (see the module docstring). ``roots``: the directories whose
    session fixtures each worker makes for itself (the rootdir and tests/, ``_roots``)."""
    names = getattr(item, "fixturenames", ())
    if "podman" in names:
        return CONTAINERS
    module = item.nodeid.split("::")[0]
    info = getattr(item, "_fixtureinfo", None)  # which fixture definitions a test uses
    if info is None:
        return module
    shared = [
        fixturedef.baseid
        for name in names
        for fixturedef in info.name2fixturedefs.get(name, ())
        if fixturedef.scope in _WIDE_SCOPES
        and item.config.rootpath / fixturedef.baseid not in roots
    ]
    # the widest such directory: every test under it that shares one lands in one unit
    return min(shared, key=len) if shared else module


def _roots(config: pytest.Config) -> set[Path]:
    return {config.rootpath, *(config.rootpath / p for p in config.getini("testpaths"))}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (its own hook, on each worker)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    roots = _roots(config)
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(work_unit(item, roots)))


@dataclass(frozen=True)
class Finding:
    """What a session-end check found: ``failed`` fails the run; the lines are reported."""

    title: str
    lines: tuple[str, ...]
    failed: bool


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workeroutput")


def is_controller(config: pytest.Config) -> bool:
    """Whether this process hands the tests to workers (and runs none itself)."""
    return not is_worker(config) and config.getoption("dist", "no") != "no"


def report(session: pytest.Session, finding: Finding) -> None:
    """Report a session-end check's result: on a worker, through the controller."""
    config = session.config
    if is_worker(config):
        output: dict[str, Any] = config.workeroutput  # type: ignore[attr-defined]
        worker = config.workerinput["workerid"]  # type: ignore[attr-defined]
        output.setdefault(_FINDINGS, []).append(
            {"title": f"[{worker}] {finding.title}", "lines": list(finding.lines),
             "failed": finding.failed}
        )  # fmt: skip
    else:
        _write(session, finding)
    if finding.failed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _write(session: pytest.Session, finding: Finding) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if finding.failed:
        reporter.write_sep("=", finding.title, red=True)
    else:
        reporter.ensure_newline()
        reporter.write_line(finding.title)
    for line in finding.lines:
        reporter.write_line(line)


class Controller:
    """On the controller: collect each worker's findings, report them when the run ends."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", None) or {}
        for entry in output.get(_FINDINGS, []):
            self.findings.append(Finding(entry["title"], tuple(entry["lines"]), entry["failed"]))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for finding in self.findings:
            report(session, finding)


def register(config: pytest.Config) -> None:
    """Register the work units, and on the controller (or a run without workers, where it
    hears from none) the collection of the workers' findings."""
    config.pluginmanager.register(sys.modules[__name__], "sllm-work-units")
    if not is_worker(config):
        config.pluginmanager.register(Controller(), "sllm-worker-findings")
