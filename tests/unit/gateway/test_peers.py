"""Gateways among several (gateway.peers), on an in-memory bus and buckets with a manual clock:
one decides, and only after it has read what the last leader left; a manual scale received by
a follower reaches the leader, and is refused clearly while nobody leads; a clean stop hands the
lease over with the scale state; the leader counts the followers' queued requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from gateway.lease import LeaseConfig
from gateway.peers import PeerHooks, Peers
from gateway.scale_state import Resumed
from sllm.bus import MemoryBus, MemoryKeyValue
from sllm.clock import ManualClock
from sllm.errors import Unavailable
from sllm.messages import FunctionLoad, LeaseRecord, StartRecord, encode

CONFIG = LeaseConfig()


@dataclass
class Gateway:
    """One gateway's side of the hooks: what it was told."""

    name: str
    resumed: list[Resumed] = field(default_factory=list)
    scales: list[tuple[str, int]] = field(default_factory=list)
    follows: int = 0
    queued: dict[str, FunctionLoad] = field(default_factory=dict)
    peers: Peers = field(init=False)

    async def on_lead(self, resumed: Resumed) -> None:
        assert not self.peers.deciding()  # not before it is done
        self.resumed.append(resumed)

    def on_follow(self) -> None:
        self.follows += 1

    def on_scale(self, function: str, replicas: int) -> None:
        self.scales.append((function, replicas))


@dataclass
class World:
    bus: MemoryBus = field(default_factory=MemoryBus)
    lease: MemoryKeyValue = field(default_factory=MemoryKeyValue)
    scale: MemoryKeyValue = field(default_factory=MemoryKeyValue)
    clock: ManualClock = field(default_factory=ManualClock)

    def gateway(self, name: str) -> Gateway:
        gw = Gateway(name)
        hooks = PeerHooks(gw.on_lead, gw.on_follow, gw.on_scale)
        gw.peers = Peers(
            self.bus, self.lease, self.scale, self.clock, name, lambda: gw.queued, hooks, CONFIG
        )
        return gw


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@asynccontextmanager
async def running(world: World, *names: str) -> AsyncIterator[list[Gateway]]:
    """Gateways ``names`` started in that order (the first leads), stopped on the way out."""
    gateways = [world.gateway(name) for name in names]
    try:
        for gw in gateways:
            await gw.peers.start()
        await settle()
        yield gateways
    finally:
        for gw in reversed(gateways):
            await gw.peers.stop()


async def test_one_decides_after_reading_what_the_last_leader_left() -> None:
    async with running(World(), "a", "b") as (a, b):
        assert a.peers.deciding() and not b.peers.deciding()
        assert a.resumed == [Resumed()]
        # the leader keeps its state in KV; a clean stop hands the lease over at once
        a.peers.scale_state.set_desired("chat", 3, a.peers.term)
        started = StartRecord("chat-1", "chat", "n1", "cpu0", 1, a.peers.term)
        await a.peers.scale_state.booked(started)
        await a.peers.stop()
        assert a.follows == 1
        await b.peers.leadership.step()
        await settle()
        assert b.peers.deciding()
        assert b.resumed == [Resumed({"chat": 3}, [started])]


async def test_a_follower_hands_a_manual_scale_to_the_leader() -> None:
    async with running(World(), "a", "b") as (a, b):
        await b.peers.scale("chat", 2)
        await a.peers.scale("code", 1)
        assert a.scales == [("chat", 2), ("code", 1)] and b.scales == []


async def test_no_leader_is_a_clear_error() -> None:
    world = World()
    # someone else holds the lease and has stopped answering (dead, not yet expired)
    await world.lease.create("leader", encode(LeaseRecord("dead")))
    async with running(world, "b") as (b,):
        assert not b.peers.deciding()
        with pytest.raises(Unavailable, match="no gateway leads right now"):
            await b.peers.scale("chat", 2)


async def test_the_leader_counts_what_waits_at_the_followers() -> None:
    async with running(World(), "a", "b") as (a, b):
        a.queued = {"chat": FunctionLoad(1, 0)}
        b.queued = {"chat": FunctionLoad(0, 2)}
        b.peers.waiting()  # a request started waiting at b: reported at once
        await settle()
        assert a.peers.others_load() == {"chat": FunctionLoad(0, 2)}
        seen = b.peers.reports.reports["a"].report.seq  # every gateway reports periodically
        a.peers.waiting()  # but the leader sends no extra report to itself
        await settle()
        assert b.peers.reports.reports["a"].report.seq == seen
