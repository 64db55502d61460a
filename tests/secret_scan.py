"""No secret in any log the test session writes: a check that fails the run otherwise.

Every log goes under the session's base temporary directory: the child processes' (gateway,
node, nats-server, SeaweedFS, `sllm up` homes: ``*.log``) and this process's own log records
(``session-logs/pytest.log``, written by a handler this plugin adds to the root logger at
INFO). When the session ends, every ``*.log`` file there is searched for

- secrets by their shape: invocation keys (``sllm_<id>_<secret>``), instance secrets
  (``sllmi_...``) and NATS NKey seeds (``SU...``), whatever their value;
- secrets by their value: every seed file (``*.nk``), NATS route password (``*.secret``) and
  `sllm up` token file under the base directory, plus the values registered with ``register``
  (admin tokens, S3 secret keys).

A hit names the file, the line number and the kind of secret (never the secret), and fails the
run. ``SLLM_SECRET_SCAN=0`` turns the check off.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import workers

PATTERNS = {
    "invocation key": re.compile(r"sllm_[0-9a-f]{12}_[A-Za-z0-9_-]{43}"),
    "instance secret": re.compile(r"sllmi_[A-Za-z0-9_-]{43}"),
    "NATS seed": re.compile(r"\bSU[A-Z2-7]{56}\b"),
}
_REGISTERED: set[str] = set()


def register(*values: str) -> None:
    """Secrets a test chose (an admin token, an S3 secret key): their value is searched for."""
    _REGISTERED.update(v for v in values if v)


def known_secrets(basetemp: Path) -> set[str]:
    """The registered values, every NKey seed, route password and `sllm up` token under
    ``basetemp``."""
    found = set(_REGISTERED)
    paths = [*basetemp.rglob("*.nk"), *basetemp.rglob("*.secret"), *basetemp.rglob("token")]
    for path in paths:
        if path.is_file():
            value = path.read_text(encoding="utf-8", errors="replace").strip()
            if len(value) >= 16:
                found.add(value)
    return found


@dataclass
class Findings:
    files: int = 0
    lines: int = 0
    problems: list[str] = field(default_factory=list)


def scan(basetemp: Path, known: set[str]) -> Findings:
    """Search every ``*.log`` under ``basetemp`` for secrets (see the module docstring)."""
    out = Findings()
    for path in sorted(basetemp.rglob("*.log")):
        if not path.is_file():
            continue
        out.files += 1
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                out.lines += 1
                kinds = [kind for kind, pattern in PATTERNS.items() if pattern.search(line)]
                if any(value in line for value in known):
                    kinds.append("known secret value")
                for kind in kinds:
                    out.problems.append(f"{path.relative_to(basetemp)}:{number}: {kind}")
    return out


class SecretScan:
    """The pytest plugin (registered by tests/conftest.py)."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("SLLM_SECRET_SCAN", "1") != "0"
        self._handler: logging.Handler | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if not self.enabled:
            return
        basetemp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        (basetemp / "session-logs").mkdir(exist_ok=True)
        handler = logging.FileHandler(basetemp / "session-logs" / "pytest.log")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self._handler = handler

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        if not self.enabled or session.config.option.collectonly:
            return
        if workers.is_controller(session.config):
            return  # each worker scanned its own directory, which holds every log of its tests
        basetemp = session.config._tmp_path_factory.getbasetemp().resolve()  # type: ignore[attr-defined]
        found = scan(basetemp, known_secrets(basetemp))
        if not found.problems:
            summary = f"secret scan: {found.files} log files, {found.lines} lines, no secret"
            workers.report(session, workers.Finding(summary, (), failed=False))
            return
        lines = (
            f"secrets in the logs of this session ({basetemp}):",
            *(f"  - {problem}" for problem in found.problems[:50]),
        )
        workers.report(session, workers.Finding("secret scan failed", lines, failed=True))
