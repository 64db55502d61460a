"""The leader lease on real NATS (gateway.leadership over a JetStream KV bucket with a TTL):
two gateways' lease loops run side by side; at no sampled instant do both lead; when the leader
stops without a word, the other leads within the TTL plus a poll; a clean stop hands over at
once; losing the NATS server that leads the lease bucket leaves at most one leader, and a
leader again after the election."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import pytest

from gateway.leadership import LEASE_BUCKET, Leadership, open_lease_bucket
from gateway.lease import LeaseConfig
from sllm.clock import SystemClock
from sllm.nats_bus import NatsBus
from sllm_cli.servers import NatsCluster, nats_client_env

pytestmark = pytest.mark.integration


def seed(cluster: NatsCluster, node_id: str | None = None) -> str:
    """The gateway role's seed file (``node_id`` None), or node ``node_id``'s (added)."""
    return nats_client_env(cluster, node_id)["SLLM_NATS_SEED_FILE"]


CONFIG = LeaseConfig()  # the gateway's: ttl 3 s, renew 1 s, poll 0.5 s


@dataclass
class Gw:
    bus: NatsBus
    lease: Leadership
    task: asyncio.Task[None] | None = None
    alive: bool = True

    def start(self) -> None:
        self.task = asyncio.create_task(self.lease.run())

    async def die(self) -> None:
        """Stop without resigning, as a SIGKILLed gateway does: no more writes. Its own view
        (``lease.leader``) still runs out by time, and stays in the two-leaders check: it must
        end before anyone else leads."""
        self.alive = False
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.bus.close()


@dataclass
class Watch:
    """Samples every 20 ms which gateways lead; records any instant with two."""

    gateways: list[Gw]
    both: list[float] = field(default_factory=list)
    leaders: list[tuple[float, str]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            leading = [g.lease.me for g in self.gateways if g.lease.leader]
            if len(leading) > 1:
                self.both.append(now)
            if leading and (not self.leaders or self.leaders[-1][1] != leading[0]):
                self.leaders.append((now, leading[0]))
            await asyncio.sleep(0.02)

    async def until_led_by(self, name: str | None, timeout_s: float) -> float:
        start = time.monotonic()
        while True:
            current = [g.lease.me for g in self.gateways if g.alive and g.lease.leader]
            if (name is None and current) or (name is not None and current == [name]):
                return time.monotonic() - start
            assert time.monotonic() - start < timeout_s, f"no leader {name} in {timeout_s}s"
            await asyncio.sleep(0.02)


async def _gateway(cluster: NatsCluster, name: str, replicas: int) -> Gw:
    bus = await NatsBus.connect(cluster.urls, name, seed_file=seed(cluster))
    kv = await open_lease_bucket(bus, replicas, CONFIG)
    return Gw(bus, Leadership(kv, name, SystemClock(), CONFIG))


async def test_one_leader_takeover_after_a_silent_death_and_a_clean_handover(
    cluster: NatsCluster,
) -> None:
    a = await _gateway(cluster, "gw-a", 3)
    b = await _gateway(cluster, "gw-b", 3)
    c = await _gateway(cluster, "gw-c", 3)
    info = await a.bus.nc.jetstream().stream_info(f"KV_{LEASE_BUCKET}")
    assert info.config.num_replicas == 3 and info.config.max_age == CONFIG.ttl_s
    watch = Watch([a, b, c])
    watcher = asyncio.create_task(watch.run())
    a.start()
    await watch.until_led_by("gw-a", 10)
    b.start()
    c.start()
    await asyncio.sleep(2 * CONFIG.ttl_s)  # followers poll; a keeps renewing
    assert [name for _, name in watch.leaders] == ["gw-a"]
    first_term = a.lease.term

    await a.die()
    took_s = await watch.until_led_by(None, 10)
    # a's last renewal was at most renew_s before it died: the key expires ttl_s after it
    assert took_s < CONFIG.ttl_s + CONFIG.poll_s + 1.0, took_s
    (new,) = [g for g in (b, c) if g.lease.leader]
    assert new.lease.term > first_term

    other = c if new is b else b
    await new.lease.resign()
    new.alive = False
    if new.task is not None:
        new.task.cancel()
    handover_s = await watch.until_led_by(other.lease.me, 5)
    assert handover_s < 2 * CONFIG.poll_s + 1.0, handover_s

    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert watch.both == []
    for g in (b, c):
        if g.task is not None:
            g.task.cancel()
            await asyncio.gather(g.task, return_exceptions=True)
        await g.bus.close()


async def test_losing_the_server_that_leads_the_lease_bucket(cluster: NatsCluster) -> None:
    a = await _gateway(cluster, "gw-x", 3)
    b = await _gateway(cluster, "gw-y", 3)
    watch = Watch([a, b])
    watcher = asyncio.create_task(watch.run())
    a.start()
    b.start()
    await watch.until_led_by(None, 10)
    js = a.bus.nc.jetstream()
    stream = (await js.stream_info(f"KV_{LEASE_BUCKET}")).cluster
    assert stream is not None and stream.leader is not None
    victim = [m.name for m in cluster.members].index(stream.leader)
    cluster.servers[victim].process.send_signal(signal.SIGKILL)
    cluster.servers[victim].process.wait()
    await asyncio.sleep(1.0)
    # Writes wait out the bucket's election (4-9 s): the lease may lapse, but never doubles.
    await watch.until_led_by(None, 20)
    await asyncio.to_thread(cluster.restart, victim)
    await asyncio.sleep(CONFIG.ttl_s)
    await watch.until_led_by(None, 20)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert watch.both == []
    for g in (a, b):
        await g.die()
