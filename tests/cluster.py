"""A platform on this machine made of real processes that can each be killed and restarted:
nats-server (JetStream in a data directory) or a cluster of them, any number of
`sllm gateway start` and of `sllm node start`, on loopback or with nodes on hosts of a
``sllm_cli.netns`` topology, with a local-directory store (or any store ``env`` names). For fault
tests (``tests/integration/faults``, ``tests/integration/ha``), ``bench/chaos.py`` and
``bench/cluster.py``; `sllm up` is the user's form of it.

Faults are injected by pid (``kill_*``: SIGKILL by default, or SIGSTOP/SIGCONT), never by
racing a timer. A restarted part keeps its identity: nats-server its port and data directory
(so the registry survives), a node its id and cache directory (so its caches survive), the
gateway its port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sllm.errors import Unavailable
from sllm.nats_auth import NatsCredentials
from sllm_cli.netns import Host
from sllm_cli.servers import (
    ManagedServer,
    NatsCluster,
    free_port,
    nats_client_env,
    nats_members,
    start_nats,
    start_nats_cluster,
    stop_process,
)

TOKEN = "cluster-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in the cluster's store: its key and its tensor bytes."""

    key: str
    nbytes: int


@dataclass
class LocalCluster:
    """``env`` applies to every gateway and node (SLLM_* settings); ``node_env`` adds to a
    node's by node id. ``nats_size`` 3 makes NATS a cluster (JetStream replicas 3, given to
    every part as a list of URLs); ``nats_host`` is where NATS listens (the bridge address of a
    topology, for nodes on its hosts). Gateways are named ``gw-0``, ``gw-1``, ...; ``gateway``
    and ``url`` are ``gw-0``'s."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, dict[str, str]] = field(default_factory=dict)
    nats_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    nats_size: int = 1
    nats_host: str = "127.0.0.1"
    nats: ManagedServer | NatsCluster | None = None
    gateways: dict[str, ManagedServer] = field(default_factory=dict)
    gateway_ports: dict[str, int] = field(default_factory=dict)
    gateway_hosts: dict[str, Host] = field(default_factory=dict)  # gateways on hosts
    nodes: dict[str, ManagedServer] = field(default_factory=dict)
    orphans: list[int] = field(default_factory=list)  # instance pids of SIGKILLed nodes

    def __post_init__(self) -> None:
        self.gateway_ports.setdefault("gw-0", self.gateway_port)

    @property
    def gateway(self) -> ManagedServer | None:
        return self.gateways.get("gw-0")

    @property
    def url(self) -> str:
        return self.url_of("gw-0")

    def url_of(self, name: str) -> str:
        host = self.gateway_hosts.get(name)
        return f"http://{host.address if host else '127.0.0.1'}:{self.gateway_ports[name]}"

    @property
    def urls(self) -> list[str]:
        return [self.url_of(name) for name in sorted(self.gateway_ports)]

    @property
    def store(self) -> Path:
        return self.root / "store"

    def _env(self, node_id: str | None = None) -> dict[str, str]:
        """A gateway's environment (``node_id`` None) or node ``node_id``'s, with its NATS
        credentials (an identity nats-server does not know yet is added, sllm.nats_auth)."""
        assert self.nats is not None, "start nats-server first"
        return {
            **os.environ,
            **nats_client_env(self.nats, node_id),
            "SLLM_STORE_URL": str(self.store),
            "SLLM_TOKEN": TOKEN,
            "SLLM_NATS_REPLICAS": str(self.nats_size),
            **self.env,
        }

    # --- parts -------------------------------------------------------------------------------
    def start_nats(self) -> None:
        """nats-server (or a cluster of ``nats_size``, routes authenticated) with
        authorization: every part connects with its own NKey seed."""
        creds = NatsCredentials(self.root / "nats-creds")
        if self.nats_size > 1:
            members = nats_members(self.root / "nats", self.nats_size, self.nats_host)
            self.nats = start_nats_cluster(members, credentials=creds)
            return
        self.nats = start_nats(
            self.root / "nats", port=self.nats_port, credentials=creds, host=self.nats_host
        )

    def start_gateway(
        self, name: str = "gw-0", timeout_s: float = 60.0, host: Host | None = None
    ) -> None:
        """Gateway ``name`` on its port (kept across restarts); on ``host`` of a topology, it
        listens on the host's address and reaches NATS and the instances over its link."""
        port = self.gateway_ports.setdefault(name, free_port())
        env = {**self._env(), "SLLM_GATEWAY_PORT": str(port), "SLLM_GATEWAY_ID": name}
        if host is not None:
            self.gateway_hosts[name] = host
            env["SLLM_GATEWAY_HOST"] = host.address
        log_name = "gateway" if name == "gw-0" else f"gateway-{name}"
        wrap = host.wrap if host is not None else ()
        self.gateways[name] = self._spawn(log_name, ["gateway", "start"], env, wrap)
        self._until(
            lambda: self._healthz(name) is not None, timeout_s, f"gateway {name}'s /healthz"
        )

    def leader(self, timeout_s: float = 30.0) -> str:
        """The gateway that decides now (every live gateway agrees on it)."""
        found: list[str] = []
        said: dict[str, Any] = {}

        def agreed() -> bool:
            said.clear()
            said.update({n: self._healthz(n) for n, g in self.gateways.items() if g.alive()})
            found[:] = [n for n, health in said.items() if health and health.get("deciding")]
            return len(found) == 1

        self._until(agreed, timeout_s, lambda: f"one gateway that decides (they said {said})")
        return found[0]

    def start_node(
        self,
        node_id: str,
        *,
        wait: bool = True,
        timeout_s: float = 120.0,
        host: Host | None = None,
    ) -> None:
        """Node ``node_id``; on ``host`` of a topology, its instances listen on the host's
        address and everything it fetches crosses the host's shaped link."""
        env = {
            **self._env(node_id),
            "SLLM_NODE_ID": node_id,
            "SLLM_CACHE_DIR": str(self.root / "cache" / node_id),
            **({"SLLM_NODE_HOST": host.address} if host is not None else {}),
            **self.node_env.get(node_id, {}),
        }
        args = ["-v", "node", "start", "--drain", "2s"]
        wrap = host.wrap if host is not None else ()
        self.nodes[node_id] = self._spawn(f"node-{node_id}", args, env, wrap)
        if wait:
            self.wait_node(node_id, timeout_s)

    def restore(
        self, gateways: tuple[str, ...] = ("gw-0",), nodes: tuple[str, ...] = ("a",)
    ) -> LocalCluster:
        """What an earlier fault test left down runs again (NATS or its dead members, the
        ``gateways``, the ``nodes``); one gateway decides; every function is deleted and the
        nodes are empty, so the next test starts with all their slots."""
        if isinstance(self.nats, NatsCluster):
            for i, server in enumerate(self.nats.servers):
                if not server.alive():
                    self.nats.restart(i)
        elif self.nats is None or not self.nats.alive():
            self.start_nats()
        for name in gateways:
            if name not in self.gateways or not self.gateways[name].alive():
                self.start_gateway(name)
        for node_id in nodes:
            if node_id not in self.nodes or not self.nodes[node_id].alive():
                self.start_node(node_id)
        self.leader()
        self.clear()
        return self

    def kill(self, part: ManagedServer | None, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to a part by pid; for SIGKILL, also reap it. Returns the pid."""
        assert part is not None, "that part is not running"
        part.process.send_signal(sig)
        if sig == signal.SIGKILL:
            part.process.wait(timeout=10)
        return part.process.pid

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> int:
        """Signal the node; its instance processes, orphaned by a SIGKILL, finish what they
        serve and exit on their own (``stop`` makes sure of it)."""
        if sig == signal.SIGKILL:
            self.orphans.extend(self.instance_pids(node_id))
        return self.kill(self.nodes[node_id], sig)

    def instance_pids(self, node_id: str) -> list[int]:
        """The node's instance processes (pre-started ones included)."""
        import psutil

        node = psutil.Process(self.nodes[node_id].process.pid)
        pids = []
        for child in node.children():
            try:
                if "runtime.instance.worker" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue  # killed already (its node reaps it)
        return pids

    def stop(self) -> None:
        for node in self.nodes.values():
            stop_process(node.process, 30.0)
        for gateway in self.gateways.values():
            stop_process(gateway.process, 30.0)
        if self.nats is not None:
            self.nats.stop()
        self._reap_orphans()
        self._drop_dram()

    def _drop_dram(self) -> None:
        """The nodes' DRAM tiers (in /dev/shm, outside ``root``) go with the cluster."""
        import shutil

        from runtime.node.main import dram_root
        from sllm.settings import NodeSettings

        for node_id in self.nodes:
            env = {"SLLM_NODE_ID": node_id, "SLLM_CACHE_DIR": str(self.root / "cache" / node_id)}
            shutil.rmtree(dram_root(NodeSettings.from_env(env)), ignore_errors=True)

    def _reap_orphans(self, grace_s: float = 20.0) -> None:
        """Instance processes of SIGKILLed nodes still alive after ``grace_s`` (one still
        importing torch reads its closed stdin only after that) are killed, by pid."""
        import psutil

        procs = []
        for pid in self.orphans:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.orphans.clear()

    # --- waiting -------------------------------------------------------------------------------
    def wait_node(self, node_id: str, timeout_s: float = 120.0) -> None:
        """Until the gateway lists ``node_id`` as live (it has heard a heartbeat)."""

        def live() -> bool:
            node = self.nodes.get(node_id)
            if node is not None and not node.alive():
                raise Unavailable(f"node {node_id} exited:\n{node.log_tail()}")
            try:
                nodes = httpx.get(f"{self.url}/system/nodes", headers=AUTH, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return any(n["node_id"] == node_id and n["live"] for n in nodes)

        self._until(live, timeout_s, f"node {node_id}'s heartbeat at the gateway")

    def _healthz(self, name: str = "gw-0") -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url_of(name)}/healthz", timeout=2)
        except httpx.TransportError:
            return None
        body: dict[str, Any] = r.json()
        return body if r.status_code == 200 else None

    def live_url(self) -> str:
        """The URL of a gateway that is running (``gw-0``'s when it is)."""
        for name in sorted(self.gateways):
            if self.gateways[name].alive():
                return self.url_of(name)
        raise Unavailable("no gateway is running")

    @staticmethod
    def _until(ready: Any, timeout_s: float, what: str | Callable[[], str]) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                about = what if isinstance(what, str) else what()
                raise Unavailable(f"timed out after {timeout_s:.0f}s waiting for {about}")
            time.sleep(0.1)

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str], wrap: tuple[str, ...] = ()
    ) -> ManagedServer:
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [*wrap, sys.executable, "-m", "sllm_cli.main", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return ManagedServer(name, proc, log_path)

    # --- functions -------------------------------------------------------------------------------
    def clear(self, timeout_s: float = 60.0) -> None:
        """Delete every function and wait until no node reports an instance of one: the next
        test starts on empty nodes (their slots free)."""
        url = self.live_url()
        for record in httpx.get(f"{url}/system/functions", headers=AUTH, timeout=10).json():
            name = record["name"]
            r = httpx.delete(f"{url}/system/functions/{name}", headers=AUTH, timeout=10)
            if r.status_code not in (200, 204, 404):
                raise Unavailable(f"delete of {name} failed: {r.status_code} {r.text}")

        left: list[str] = []

        def empty() -> bool:
            nodes = httpx.get(f"{url}/system/nodes", headers=AUTH, timeout=5).json()
            left[:] = [
                f"{i.get('function')}/{i.get('instance_id')} on {n.get('node_id')}: {i['state']}"
                for n in nodes
                for i in n["instances"]
                if i["state"] not in ("stopped", "failed")
            ]
            return not left

        self._until(empty, timeout_s, lambda: f"every instance to stop (left: {', '.join(left)})")

    def checkpoint(self, hf_dir: Path, key: str) -> Checkpoint:
        """``add_checkpoint``, named with its key."""
        return Checkpoint(key, self.add_checkpoint(hf_dir, key))

    def add_checkpoint(self, hf_dir: Path, key: str) -> int:
        """Convert a Hugging Face directory and push it into the store; its tensor bytes."""
        from runtime.ckpt.convert import convert_checkpoint
        from runtime.store.local import LocalStore
        from runtime.store.push import push_checkpoint

        converted = self.root / "converted" / key.replace("/", "_")
        index = convert_checkpoint(hf_dir, converted)
        self.store.mkdir(parents=True, exist_ok=True)
        push_checkpoint(converted, LocalStore(self.store), key)
        return index.total_bytes

    def deploy(self, name: str, checkpoint: str, nbytes: int, **scale: Any) -> dict[str, Any]:
        spec = {
            "name": name,
            "model": "tiny",
            "handler": "chat",
            "auth": "public",  # the fault runs' clients send no invocation key
            "scale": scale,
            "generation": {"max_tokens": 8, "temperature": 0.0},
        }
        body = {"spec": spec, "checkpoint": checkpoint, "checkpoint_bytes": nbytes}
        r = httpx.post(f"{self.url}/system/functions", json=body, headers=AUTH, timeout=10)
        if r.status_code != 201:
            raise Unavailable(f"deploy of {name} failed: {r.status_code} {r.text}")
        result: dict[str, Any] = r.json()
        return result
