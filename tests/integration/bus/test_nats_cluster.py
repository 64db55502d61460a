"""Three nats-servers in a cluster, JetStream replicas 3, with the platform's credentials: a
client given every URL does not see the loss of any one server. Each server is SIGKILLed in
turn (the leader of the replicated bucket, the server the gateway is on, the server the node
is on), and started again, while KV writes and reads, request-reply (gateway to node) and
publish-subscribe (node heartbeats) run: no operation fails. A server without the cluster's
route password cannot join it.

Each kill falls between two rounds of traffic, once the clients on that server have seen it
go: core NATS delivers at most once, so a request already written to a server that dies is
lost and its requester times out (the gateway's commands treat that as transient and retry,
``gateway.commands``; tests/integration/ha loses no request over it). What must hold is that
every operation sent after the loss succeeds."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.registry import Registry
from sllm.bus import Message
from sllm.errors import StaleRevision
from sllm.nats_bus import NatsBus, NatsKeyValue
from sllm.spec import FunctionRecord, FunctionSpec
from sllm_cli.servers import NatsCluster, find_binary, free_port, nats_client_env, stop_process

pytestmark = pytest.mark.integration

NODE = "cluster-n1"
CMD = f"sllm.node.{NODE}.cmd"
BEAT = f"sllm.node.{NODE}.heartbeat"


def seed(cluster: NatsCluster, node_id: str | None = None) -> str:
    """The gateway role's seed file (``node_id`` None), or node ``node_id``'s (added)."""
    return nats_client_env(cluster, node_id)["SLLM_NATS_SEED_FILE"]


@dataclass
class Traffic:
    """KV put+get, a request and a publish per round, each checked; failures recorded."""

    requester: NatsBus
    publisher: NatsBus
    kv: NatsKeyValue
    rounds: int = 0
    failures: list[str] = field(default_factory=list)
    received: int = 0
    slowest_s: float = 0.0
    # held for a round; a kill holds it so that no operation is in flight on the dying server
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)


async def _run(traffic: Traffic, stop: asyncio.Event) -> None:
    kv = traffic.kv
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            async with traffic.gate:
                await kv.put(f"fn.{n % 7}", str(n).encode())
                assert await kv.get(f"fn.{n % 7}") == str(n).encode()
                assert await traffic.requester.request(CMD, b"%d" % n, 10.0) == b"%d" % n
                await traffic.publisher.publish(BEAT, b"%d" % n)
        except Exception as exc:
            traffic.failures.append(f"round {n}: {exc!r}")
        traffic.slowest_s = max(traffic.slowest_s, time.monotonic() - started)
        traffic.rounds += 1
        await asyncio.sleep(0.02)


async def _rounds_after(traffic: Traffic, count: int, timeout_s: float = 30.0) -> None:
    target = traffic.rounds + count
    deadline = time.monotonic() + timeout_s
    while traffic.rounds < target:
        assert time.monotonic() < deadline, f"traffic stalled: {traffic.failures[-3:]}"
        await asyncio.sleep(0.05)


async def _kill_between_rounds(
    traffic: Traffic, cluster: NatsCluster, victim: int, buses: list[NatsBus]
) -> None:
    """SIGKILL server ``victim`` with no operation in flight, and resume the traffic once none
    of ``buses`` still counts itself connected to it (nothing is then written to its socket)."""
    port = cluster.members[victim].client_port
    async with traffic.gate:
        cluster.servers[victim].process.send_signal(signal.SIGKILL)
        cluster.servers[victim].process.wait()
        deadline = time.monotonic() + 10
        while any(_port(bus) == port for bus in buses):
            assert time.monotonic() < deadline, "a client never saw its server die"
            await asyncio.sleep(0.01)


async def _until_found(registry: Registry, name: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while registry.find(name) is None:
        assert time.monotonic() < deadline, f"{name} never reached the registry"
        await asyncio.sleep(0.02)


def _port(bus: NatsBus) -> int | None:
    """The client port of the server ``bus`` is connected to (None while it is not)."""
    url = bus.nc.connected_url
    return url.port if bus.nc.is_connected and url is not None else None


def _index_of_port(cluster: NatsCluster, bus: NatsBus) -> int:
    port = _port(bus)
    assert port is not None
    return [m.client_port for m in cluster.members].index(port)


async def test_losing_any_one_server_is_invisible(cluster: NatsCluster, tmp_path: Path) -> None:
    requester = await NatsBus.connect(cluster.urls, "requester", seed_file=seed(cluster))
    # the comma-separated form
    responder = await NatsBus.connect(cluster.url, "responder", seed_file=seed(cluster, NODE))
    beats: list[bytes] = []

    async def echo(msg: Message) -> bytes:
        return msg.data

    async def on_beat(msg: Message) -> None:
        beats.append(msg.data)

    await responder.subscribe(CMD, echo)
    await requester.subscribe(BEAT, on_beat)
    kv = await requester.key_value("cluster_test", replicas=3)
    js = requester.nc.jetstream()
    info = await js.stream_info("KV_cluster_test")
    assert info.config.num_replicas == 3
    traffic = Traffic(requester, responder, kv)
    stop = asyncio.Event()
    task = asyncio.create_task(_run(traffic, stop))
    try:
        await _rounds_after(traffic, 10)
        names = [m.name for m in cluster.members]
        for victim_of in ("bucket leader", "requester", "responder"):
            if victim_of == "bucket leader":
                leader = (await js.stream_info("KV_cluster_test")).cluster
                assert leader is not None and leader.leader is not None
                victim = names.index(leader.leader)
            else:
                victim = _index_of_port(
                    cluster, requester if victim_of == "requester" else responder
                )
            await _kill_between_rounds(traffic, cluster, victim, [requester, responder])
            before = len(beats)
            await _rounds_after(traffic, 20)
            assert len(beats) > before, f"no publish got through after killing {victim_of}'s server"
            await asyncio.to_thread(cluster.restart, victim)
            await _rounds_after(traffic, 10)
    finally:
        stop.set()
        await task
        await requester.close()
        await responder.close()
    assert traffic.failures == []
    # A write waits out the bucket's Raft election (4-9 s) but never fails.
    assert traffic.slowest_s < 15.0


async def test_a_single_replica_bucket_follows_onto_the_cluster(cluster: NatsCluster) -> None:
    """A registry made on one server (replicas 1) is moved to 3 replicas when opened so."""
    bus = await NatsBus.connect(cluster.urls, "upgrade", seed_file=seed(cluster))
    try:
        kv = await bus.key_value("upgrade_test", replicas=1)
        await kv.put("fn.chat", b"v1")
        kv = await bus.key_value("upgrade_test", replicas=3)
        info = await bus.nc.jetstream().stream_info("KV_upgrade_test")
        assert info.config.num_replicas == 3
        assert await kv.get("fn.chat") == b"v1"
        revision = await kv.create("lease", b"a")
        with pytest.raises(StaleRevision):
            await kv.create("lease", b"b")
        with pytest.raises(StaleRevision):
            await kv.update("lease", b"b", revision - 1)
        assert await kv.update("lease", b"b", revision) > revision
    finally:
        await bus.close()


def _route_refusals(cluster: NatsCluster) -> int:
    """Route connections the members refused (nats-server logs "rid:N - authentication error")."""
    return sum(
        1
        for server in cluster.servers
        for line in server.log_path.read_text(errors="replace").splitlines()
        if " rid:" in line and "authentication error" in line
    )


def test_a_server_without_the_route_password_cannot_join(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    """Routes carry everything (every message, JetStream's Raft traffic): a nats-server that
    knows where the cluster is but not its route password is refused by every member."""
    before = _route_refusals(cluster)
    http_port = free_port()
    cmd = [
        find_binary("nats-server"),
        "-a", "127.0.0.1", "-p", str(free_port()), "-m", str(http_port), "-n", "rogue",
        "--cluster_name", "sllm", "--cluster", f"nats://127.0.0.1:{free_port()}",
        "--routes", ",".join(cluster.routes()),
    ]  # fmt: skip
    log = tmp_path / "rogue.log"
    with open(log, "wb") as out:
        rogue = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15.0
        while _route_refusals(cluster) < before + len(cluster.servers):
            assert rogue.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the members never refused the rogue's routes"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/routez", timeout=5) as resp:
            assert json.load(resp)["num_routes"] == 0
    finally:
        stop_process(rogue)


def _meta_leader(cluster: NatsCluster) -> str:
    """The JetStream meta leader's name (``/jsz`` of any live member)."""
    for member, server in zip(cluster.members, cluster.servers, strict=True):
        if server.alive():
            url = f"http://{member.host}:{member.http_port}/jsz"
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(json.load(resp)["meta_cluster"]["leader"])
    raise AssertionError("no member is alive")


async def test_a_registry_whose_watch_consumer_is_lost_stays_current(
    cluster: NatsCluster,
) -> None:
    """A watch's ordered consumer lives on one server, not necessarily its client's. That server
    (not the JetStream meta leader, so a new watch can be made at once) is SIGKILLed; the
    client stays connected. A function deployed meanwhile reaches the registry within
    seconds: nats-py alone noticed the lost consumer after two missed 5 s heartbeats (a change
    seen 20 s late here), and a gateway's registry stayed stale that long."""
    writer_bus = await NatsBus.connect(cluster.urls, "watch-writer", seed_file=seed(cluster))
    js = writer_bus.nc.jetstream()
    writer = Registry(await writer_bus.key_value("watch_test", replicas=3), retry_s=0.2)
    await writer.load()
    await writer.create(FunctionRecord(FunctionSpec(name="a", model="m"), "k", 1))
    names = [m.name for m in cluster.members]
    readers: list[tuple[NatsBus, Registry]] = []
    host = -1
    try:
        found: Registry | None = None
        for i in [0, 1, 2] * 4:  # one reader per server until its consumer lands elsewhere
            bus = await NatsBus.connect(cluster.members[i].url, f"r{i}", seed_file=seed(cluster))
            before = {c.name for c in await js.consumers_info("KV_watch_test")}
            registry = Registry(await bus.key_value("watch_test", replicas=3), retry_s=0.2)
            await registry.load()
            readers.append((bus, registry))
            # The watch's snapshot comes from its consumer's replica, which may not have
            # applied the write yet (it was acked by two of three); the watch brings it then.
            await _until_found(registry, "a")
            (mine,) = [c for c in await js.consumers_info("KV_watch_test") if c.name not in before]
            assert mine.cluster is not None and mine.cluster.leader is not None
            host = names.index(mine.cluster.leader)
            if host != i and mine.cluster.leader != _meta_leader(cluster):
                found = registry
                break
        assert found is not None, "no consumer landed away from its client and the meta leader"
        cluster.servers[host].process.send_signal(signal.SIGKILL)
        cluster.servers[host].process.wait()
        # waits out the bucket's election if its leader was there
        await writer.create(FunctionRecord(FunctionSpec(name="b", model="m"), "k", 1))
        await _until_found(found, "b")
    finally:
        for bus, registry in readers:
            await registry.stop()
            await bus.close()
        await writer.stop()
        await writer_bus.close()
        if host >= 0 and not cluster.servers[host].alive():
            await asyncio.to_thread(cluster.restart, host)
