"""The suite on xdist workers (tests/workers.py), each case a pytest session on two workers in
a subprocess: tests that share a package's or a module's fixture run on one worker, and a
leak or a secret found on a worker fails the whole run, named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from tests import inner_session

SECRET = "a-registered-secret-for-the-worker-test"
CONFTEST = f"""
from tests import workers
from tests.leaks import LeakCheck
from tests.secret_scan import SecretScan, register

register("{SECRET}")

def pytest_configure(config):
    config.pluginmanager.register(LeakCheck(), "sllm-leak-check")
    config.pluginmanager.register(SecretScan(), "sllm-secret-scan")
    workers.register(config)
"""


def on_two_workers(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``files`` on two workers; ``record(name)`` in a test writes down its worker under
    ``tmp_path/seen``."""
    seen = tmp_path / "seen"
    seen.mkdir()
    record = f"""
import os
from pathlib import Path

def record(name):
    (Path({str(seen)!r}) / name).write_text(os.environ["PYTEST_XDIST_WORKER"])
"""
    return inner_session.run_session(
        tmp_path, CONFTEST, {"record.py": record, **files}, "-n", "2", "--dist", "loadgroup"
    )


def test_tests_sharing_a_fixture_instance_run_on_one_worker(tmp_path: Path) -> None:
    stage_tests = "".join(
        f"def test_{i}(stage):\n    record(f'stage-{{__name__}}-{i}')\n" for i in range(4)
    )
    module_tests = "".join(f"def test_{i}(engine):\n    record('engine-{i}')\n" for i in range(6))
    plain = "".join(f"def test_{i}():\n    record(f'plain-{{__name__}}-{i}')\n" for i in range(4))
    files = {
        "pkg/conftest.py": """
            import pytest

            @pytest.fixture(scope="package")
            def stage():
                return object()
            """,
        "pkg/test_a.py": "from record import record\n" + stage_tests,
        "pkg/test_b.py": "from record import record\n" + stage_tests,
        "test_module.py": "import pytest\nfrom record import record\n\n"
        + "@pytest.fixture(scope='module')\ndef engine():\n    return object()\n\n"
        + module_tests,
        **{f"test_plain_{k}.py": "from record import record\n" + plain for k in range(4)},
    }  # fmt: skip
    result = on_two_workers(tmp_path, files)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {p.name: p.read_text() for p in (tmp_path / "seen").iterdir()}
    assert len(seen) == 8 + 6 + 16, seen
    assert len({w for name, w in seen.items() if name.startswith("stage-")}) == 1, seen
    assert len({w for name, w in seen.items() if name.startswith("engine-")}) == 1, seen
    assert set(seen.values()) == {"gw0", "gw1"}, seen  # and the run was shared out
    # a clean run: each worker's secret scan reports through the controller
    assert "[gw0] secret scan:" in result.stdout and "[gw1] secret scan:" in result.stdout


def test_a_leak_or_a_secret_on_a_worker_fails_the_run_named(tmp_path: Path) -> None:
    marker = f"302.{os.getpid()}"  # unique: another checkout may run this test at once
    files = {
        "test_leaks.py": f"""
            import subprocess
            KEEP = []
            def test_leaves_a_process():
                KEEP.append(subprocess.Popen(["sleep", "{marker}"]))
            """,
        "test_secret.py": f"""
            def test_logs_a_secret(tmp_path):
                (tmp_path / "gateway.log").write_text("token {SECRET}\\n")
            """,
    }
    result = on_two_workers(tmp_path, files)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "2 passed" in out, out
    assert "leak check failed" in out and f"sleep {marker}" in out, out
    assert "secret scan failed" in out and "gateway.log:1: known secret value" in out, out
    assert SECRET not in out
    sleepers = [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]
    ]
    assert sleepers == [], out
