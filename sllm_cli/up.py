"""`sllm up`: the whole platform on one machine, in the foreground.

Starts nats-server (JetStream under ``$SLLM_HOME/nats``, so the function registry survives),
then ``sllm gateway start`` and ``sllm node start`` as child processes whose environment points
them at it, at a local-directory store (``$SLLM_HOME/store``) and at the node cache
(``$SLLM_HOME/cache``). NATS accepts only the NKeys made under ``$SLLM_HOME/secrets/nats``
(one for the gateway, one for the node). The token is generated once and kept in ``$SLLM_HOME/token``, so a
second `sllm up` with the same home finds its registry, store, caches and token again. The
gateway URL and token go to ``~/.config/sllm/config.yaml`` for the other CLI verbs.

Ctrl-C or SIGTERM stops the node (its instances drain), the gateway, then NATS.

`sllm up` supervises its children (issue 14): one that dies on its own (crashed, killed) is
restarted, with the same environment and ports, after a backoff (0.5 s, then doubling up to
30 s while it keeps dying within 60 s of its start), each restart logged on stderr. The
platform keeps its state across a restart: the registry is in JetStream on disk, the caches
in the node's cache directory and DRAM tier, the token in the home. Only a child that keeps
crashing right after starting (6 times in a row) stops the rest and makes `sllm up` exit 1
with the tail of its log.

With ``--ha``, NATS is a cluster of three nats-servers (``$SLLM_HOME/nats-cluster/nats-<i>``)
with JetStream replicas 3 for the gateway's buckets, their routes authenticated with a password
kept beside the seeds; each member is supervised like the other children (losing one of three
is invisible to the gateway and the node, which are given all three).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from sllm.errors import Conflict, Unavailable
from sllm.nats_auth import NatsCredentials
from sllm.settings import ENVIRONMENT, home
from sllm_cli.app import Groups
from sllm_cli.client import ClientConfig, GatewayClient, config_path, write_config_file
from sllm_cli.servers import (
    ManagedServer,
    NatsCluster,
    nats_members,
    port_open,
    start_nats,
    start_nats_cluster,
)
from sllm_cli.supervisor import supervise

DEMO_FUNCTION = "smollm2-chat"
DEMO_QUESTION = "What is the capital of France?"
FUNCTIONS_DIR = Path(__file__).resolve().parents[1] / "functions"
# 120 s: a cold node imports torch and transformers (~2.5 s here) and probes its tiers; on a
# loaded 2-core machine that has taken tens of seconds, so allow ample headroom.
START_TIMEOUT_S = 120.0
# 30 min: a node running instances in containers prepares the runtime image before its first
# heartbeat; the first time on a machine that is a debootstrap and an image build (minutes).
IMAGE_TIMEOUT_S = 1800.0

# 40 s: the node drains its instances for up to 30 s (in-flight requests finish) before it
# exits; SIGKILL only after that and a margin.
NODE_STOP_TIMEOUT_S = 40.0


class _Stop(BaseException):
    """SIGTERM arrived: unwind to the clean shutdown. A BaseException, as KeyboardInterrupt
    is: it may come while a child is being restarted, and the supervisor's ``except
    Exception`` (a start that failed) must not take it for a failed start and go on."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `sllm up` itself dies (even by SIGKILL), so
    no gateway or node outlives it. Linux prctl(PR_SET_PDEATHSIG=1, SIGTERM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def load_or_create_token(sllm_home: Path) -> str:
    """The platform's token, kept in ``$SLLM_HOME/token`` (mode 0600) across restarts."""
    path = sllm_home / "token"
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token


@contextmanager
def home_lock(sllm_home: Path) -> Iterator[None]:
    """One `sllm up` per home: a second would fight over the NATS store and the caches."""
    lock_path = sllm_home / "up.lock"
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(
                f"another `sllm up` is already running with home {sllm_home} (stop it first, "
                "or pass --home for a separate platform)"
            ) from None
        yield


def child_env(
    base: dict[str, str],
    sllm_home: Path,
    nats_url: str,
    port: int,
    token: str,
    cpu_slots: int | None,
    instances: str = "auto",
    nats_replicas: int = 1,
) -> dict[str, str]:
    """The environment of the gateway and the node (sllm.settings reads it). ``nats_url``: one
    URL or several, comma-separated."""
    env = dict(base)
    env.update(
        SLLM_HOME=str(sllm_home),
        SLLM_NATS_URL=nats_url,
        SLLM_NATS_REPLICAS=str(nats_replicas),
        SLLM_GATEWAY_HOST="127.0.0.1",
        SLLM_GATEWAY_PORT=str(port),
        SLLM_TOKEN=token,
    )
    env.setdefault("SLLM_STORE_URL", str(sllm_home / "store"))
    if not env["SLLM_STORE_URL"]:
        env["SLLM_STORE_URL"] = str(sllm_home / "store")
    if cpu_slots is not None:
        env["SLLM_CPU_SLOTS"] = str(cpu_slots)
    env["SLLM_INSTANCES"] = instances
    env.pop("SLLM_GATEWAY_URL", None)
    return env


def start_child(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> ManagedServer:
    """`python -m sllm_cli.main <args>` with its output appended to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "sllm_cli.main", *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            # Own session: Ctrl-C reaches only `sllm up`, which stops children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return ManagedServer(name, proc, log_path)


def wait_until(
    what: str, ready: Callable[[], bool], children: list[ManagedServer], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive():
                raise Unavailable(
                    f"{child.name} exited while waiting for {what} (log {child.log_path}):\n"
                    f"{child.log_tail()}"
                )
        if ready():
            return
        time.sleep(0.2)
    raise Unavailable(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class Platform:
    """``starters``: how to start each child again (by name), for the supervisor."""

    url: str
    token: str
    home: Path
    servers: list[ManagedServer] = field(default_factory=list)
    starters: dict[str, Callable[[], ManagedServer]] = field(default_factory=dict)
    # --ha: the NATS cluster, whose members are also in ``servers``
    cluster: NatsCluster | None = None

    def stop(self, out: IO[str]) -> None:
        """Node first (instances drain), then gateway, then NATS."""
        for server in reversed(self.servers):
            if server.alive():
                print(f"stopping {server.name} ...", file=out, flush=True)
            server.stop(timeout_s=NODE_STOP_TIMEOUT_S if server.name == "node" else 10.0)
        if self.cluster is not None:  # a member restarted while a signal came is stopped too
            self.cluster.stop()


def start_platform(args: argparse.Namespace, sllm_home: Path, platform: Platform) -> None:
    """Fill ``platform.servers`` as each starts, so a failure half-way still stops them."""
    port: int = args.port
    if port_open("127.0.0.1", port):
        raise Conflict(
            f"port {port} is already in use (another `sllm up` or a gateway?): stop it or pass "
            "--port"
        )
    # NATS refuses connections without credentials: the gateway and the node get their own
    # NKeys, made on the first start and kept under the home (sllm.nats_auth); with --ha the
    # cluster's members also authenticate each other's routes (route.secret beside them)
    creds = NatsCredentials(sllm_home / "secrets" / "nats")
    node_id = os.environ.get("SLLM_NODE_ID") or ENVIRONMENT["SLLM_NODE_ID"][0]
    gateway_seed, node_seed = creds.gateway(), creds.node(node_id)
    if args.ha:
        cluster = start_nats_cluster(nats_members(sllm_home / "nats-cluster", 3), credentials=creds)
        platform.cluster = cluster
        platform.servers.extend(cluster.servers)
        for i, member in enumerate(cluster.members):
            # a member starts again with its name, ports and store, as a restarted pod would
            platform.starters[member.name] = functools.partial(cluster.restart, i)
        nats_url, replicas = cluster.url, 3
    else:
        nats = start_nats(sllm_home / "nats", credentials=creds)
        platform.servers.append(nats)
        nats_port = nats.ports["client"]  # a restarted nats-server takes the same port
        platform.starters["nats-server"] = lambda: start_nats(
            sllm_home / "nats", port=nats_port, credentials=creds
        )
        nats_url, replicas = f"nats://127.0.0.1:{nats_port}", 1
    env = child_env(
        dict(os.environ),
        sllm_home,
        nats_url,
        port,
        platform.token,
        args.cpu_slots,
        args.instances,
        replicas,
    )
    logs = sllm_home / "logs"
    gateway_env = {**env, "SLLM_NATS_SEED_FILE": str(gateway_seed)}
    node_env = {**env, "SLLM_NATS_SEED_FILE": str(node_seed), "SLLM_NODE_ID": node_id}
    platform.starters.update(
        gateway=lambda: start_child("gateway", ["gateway", "start"], gateway_env, logs),
        node=lambda: start_child("node", ["node", "start"], node_env, logs),
    )
    platform.servers.append(platform.starters["gateway"]())
    platform.servers.append(platform.starters["node"]())
    client = GatewayClient(ClientConfig(platform.url, platform.token), timeout_s=5.0)
    with client:
        wait_until("the gateway's /healthz", client.healthy, platform.servers, START_TIMEOUT_S)

        def node_reported() -> bool:
            try:
                return len(client.nodes()) > 0
            except Unavailable:
                return False

        if args.instances != "process":
            print(
                "the node prepares its runtime image when it runs instances in containers "
                f"(the first time: minutes; see {logs / 'node.log'})",
                flush=True,
            )
        timeout = START_TIMEOUT_S if args.instances == "process" else IMAGE_TIMEOUT_S
        wait_until("a node heartbeat", node_reported, platform.servers, timeout)


def run_demo(platform: Platform) -> None:
    """Deploy functions/smollm2-chat and ask it one question (greedy, so the answer is stable)."""
    from sllm_cli.fn import deploy_folder, print_events

    folder = FUNCTIONS_DIR / DEMO_FUNCTION
    print(f"\ndeploying {folder} ...", flush=True)
    with GatewayClient(ClientConfig(platform.url, platform.token), timeout_s=60.0) as client:
        deploy_folder(client, folder)
        print(f"\n> {DEMO_QUESTION}", flush=True)
        body = {
            "messages": [{"role": "user", "content": DEMO_QUESTION}],
            "max_tokens": 48,
            "temperature": 0.0,
            "stream": True,
        }
        print_events(client.invoke(DEMO_FUNCTION, body, timeout_s=START_TIMEOUT_S * 3), False)


def print_banner(platform: Platform) -> None:
    url, token = platform.url, platform.token
    print(
        f"""
sllm is up
  gateway   {url}
  token     {token}
  config    {config_path()} (the sllm CLI reads URL and token from here)
  home      {platform.home} (store, caches, registry; logs in {platform.home / "logs"})

  sllm fn list
  sllm fn new my-chat --template llm-chat
  curl -H "Authorization: Bearer {token}" {url}/system/functions
""",
        flush=True,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def cmd_up(args: argparse.Namespace) -> int:
    sllm_home = Path(os.path.expanduser(args.home)) if args.home else home()
    sllm_home = sllm_home.resolve()
    sllm_home.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    platform = Platform(
        url=f"http://127.0.0.1:{args.port}", token=load_or_create_token(sllm_home), home=sllm_home
    )
    code = 0
    try:
        with home_lock(sllm_home):
            try:
                print(f"starting sllm in {sllm_home} ...", flush=True)
                start_platform(args, sllm_home, platform)
                write_config_file(config_path(), platform.url, platform.token)
                print_banner(platform)
                if args.demo:
                    run_demo(platform)
                    print("\nthe platform keeps running; Ctrl-C stops it", flush=True)
                code = supervise(platform.servers, platform.starters)
            except (KeyboardInterrupt, _Stop):
                print("\nshutting down ...", flush=True)
            finally:
                platform.stop(sys.stdout)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 0:
        print("stopped", flush=True)
    return code


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    default_port = int(os.environ.get("SLLM_GATEWAY_PORT") or ENVIRONMENT["SLLM_GATEWAY_PORT"][0])
    p = root.add_parser(
        "up",
        help="run NATS, the gateway and a node on this machine (Ctrl-C stops them)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--demo", action="store_true", help=f"deploy {DEMO_FUNCTION} and ask it")
    p.add_argument("--home", help="data directory (default: $SLLM_HOME or ~/.local/share/sllm)")
    p.add_argument("--port", type=int, default=default_port, help="gateway port (default 8080)")
    p.add_argument("--cpu-slots", type=int, help="instances the node runs at once without CUDA")
    p.add_argument(
        "--instances",
        choices=("auto", "process", "container"),
        default=os.environ.get("SLLM_INSTANCES") or "auto",
        help="auto (default): each instance in its own container when podman is usable here "
        "(root), else child processes of the node",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="NATS as a cluster of three (JetStream replicas 3; a dead member is restarted)",
    )
    p.set_defaults(func=cmd_up)
