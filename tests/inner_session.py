"""A small pytest session in a subprocess, for the tests of the suite's own plugins (the leak
check, the secret scan, the work units on xdist workers): the plugin under test sees only
what that session did."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_session(
    tmp_path: Path, conftest: str, files: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Write ``conftest`` and ``files`` (relative path -> source, dedented) under ``tmp_path``
    and run pytest there with ``args``, its base directory ``tmp_path/base``."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(conftest))
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)  # this test may itself run on a worker
    env.pop("PYTEST_XDIST_TESTRUNUID", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "base"), "-c", "/dev/null", "--rootdir", str(tmp_path), *args,
         str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
