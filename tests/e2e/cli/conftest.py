"""`sllm up` in the background, driven as a user drives it: subprocesses with their own HOME
and SLLM_HOME, the CLI finding the gateway through the config file `sllm up` writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sllm_cli.servers import free_port

REPO = Path(__file__).resolve().parents[3]
SLLM = str(Path(sys.executable).parent / "sllm")
# Generous: on a busy 2-core machine the node's first instance imports torch in a new process.
UP_TIMEOUT_S = 180.0


def user_env(home: Path, sllm_home: Path) -> dict[str, str]:
    """A clean user environment: nothing of the developer's own sllm settings leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLLM_", "AWS_"))}
    env.pop("XDG_CONFIG_HOME", None)
    # SLLM_VLLM=off: these tests drive the CLI on tiny models the transformers backend runs;
    # tests/integration/vllm covers the vLLM backend
    env.update(HOME=str(home), SLLM_HOME=str(sllm_home), PYTHONUNBUFFERED="1", SLLM_VLLM="off")
    return env


@dataclass
class Up:
    """One `sllm up` process and what it printed."""

    env: dict[str, str]
    port: int
    instances: str = "process"  # tests run instances as processes unless they say otherwise
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> None:
        self.output = []
        self.process = subprocess.Popen(
            [
                SLLM,
                "up",
                "--port",
                str(self.port),
                "--cpu-slots",
                "3",
                "--instances",
                self.instances,
                *extra,
            ],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        proc = self.process
        ready = threading.Event()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.output.append(line)
                if line.startswith("sllm is up"):
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()
        if not ready.wait(UP_TIMEOUT_S) or proc.poll() is not None:
            self.stop()
            pytest.fail("sllm up did not come up:\n" + "".join(self.output[-40:]))

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit status."""
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        self.process = None
        return code

    def text(self) -> str:
        return "".join(self.output)


@dataclass
class Cli:
    env: dict[str, str]
    cwd: Path

    def __call__(
        self, *argv: str, input: str | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SLLM, *argv],
            env=self.env,
            cwd=self.cwd,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HOME, SLLM_HOME) of the test user."""
    root = tmp_path_factory.mktemp("user")
    (root / "home").mkdir()
    return root / "home", root / "sllm-home"


@pytest.fixture(scope="module")
def platform(user: tuple[Path, Path]) -> Iterator[Up]:
    home, sllm_home = user
    up = Up(user_env(home, sllm_home), free_port())
    up.start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def cli(platform: Up, user: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """The CLI as the user runs it: no flags, no variables; the config file says where."""
    work = tmp_path_factory.mktemp("work")
    return Cli(platform.env, work)
