"""``SnapshotCache`` against a full ``snapshot_from_heartbeats`` build: over randomized
sequences of heartbeats (new objects, restarted nodes reusing a seq), bookings, protected
instances, registry and bandwidth changes, nodes leaving and joining, every policy decides the
same on both; and the gateway's scheduler hits the cache when nothing changed."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from gateway.placement import PolicyScheduler
from gateway.scheduler.policies import POLICIES, place
from gateway.scheduler.snapshot import SnapshotCache, snapshot_from_heartbeats
from gateway.scheduler.types import ClusterSnapshot, MigrationFit, PlacementRequest
from sllm.messages import CacheEntryState, DeviceState, InstanceState, NodeHeartbeat

GB = 10**9
NODES = [f"n{i}" for i in range(6)]
FUNCTIONS = {f"f{i}": (f"ck-{i}", (1 + i % 3) * GB) for i in range(8)}
STATES = ("ready", "ready", "ready", "starting", "draining", "stopped")


def random_heartbeat(rng: random.Random, node_id: str, seq: int) -> NodeHeartbeat:
    devices: list[DeviceState] = []
    instances: list[InstanceState] = []
    for d in range(rng.randint(1, 4)):
        device = f"cuda:{d}"
        if rng.random() < 0.6:
            fn = rng.choice([*FUNCTIONS, "unknown"])
            iid = f"{node_id}-{fn}-{d}"
            devices.append(DeviceState(device, "cuda", 80 * GB, iid))
            instances.append(
                InstanceState(
                    iid,
                    fn,
                    device,
                    rng.choice(STATES),
                    "http://127.0.0.1:1",
                    rng.choice((0, 0, 1, 3)),
                    rng.randint(0, 2000),
                    rng.randint(0, 500),
                )
            )
        else:
            devices.append(DeviceState(device, "cuda", 80 * GB, None))
    cache = {
        tier: [
            CacheEntryState(ck, nbytes)
            for ck, nbytes in FUNCTIONS.values()
            if rng.random() < (0.3 if tier == "dram" else 0.5)
        ]
        for tier in ("dram", "ssd")
    }
    return NodeHeartbeat(
        node_id=node_id,
        seq=seq,
        devices=devices,
        instances=instances,
        cache=cache,
        bandwidths={
            "dram": rng.choice((10e9, 20e9)),
            "ssd": rng.choice((2e9, 4e9)),
            "store": rng.choice((0.5e9, 1e9)),
        },
        load_queue_s=rng.choice((0.0, 0.0, 0.5, 3.0)),
    )


class World:
    """The inputs of one decision, changed one random step at a time."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.heartbeats = {n: random_heartbeat(rng, n, 1) for n in NODES}
        self.reserved: dict[str, set[str]] = {}
        self.functions = dict(FUNCTIONS)
        self.bandwidths: dict[str, dict[str, float]] = {}
        self.protected: set[str] = set()

    def instance_ids(self) -> list[str]:
        return [i.instance_id for hb in self.heartbeats.values() for i in hb.instances]

    def step(self) -> None:
        rng = self.rng
        node = rng.choice(NODES)
        kind = rng.randrange(8)
        if kind == 0:  # a new heartbeat
            seq = self.heartbeats[node].seq + 1 if node in self.heartbeats else 1
            self.heartbeats[node] = random_heartbeat(rng, node, seq)
        elif kind == 1:  # the node restarted: its seq starts again, content differs
            self.heartbeats[node] = random_heartbeat(rng, node, 1)
        elif kind == 2:  # the node went stale, or came back
            if node in self.heartbeats and len(self.heartbeats) > 1:
                del self.heartbeats[node]
            else:
                self.heartbeats[node] = random_heartbeat(rng, node, 1)
        elif kind == 3:  # a load was sent (or its instance showed up)
            devices = self.reserved.setdefault(node, set())
            device = f"cuda:{rng.randrange(4)}"
            devices.symmetric_difference_update({device})
        elif kind == 4:
            ids = self.instance_ids()
            if ids:
                self.protected.symmetric_difference_update({rng.choice(ids)})
        elif kind == 5:  # a function redeployed with another checkpoint, or deleted
            fn = rng.choice(list(FUNCTIONS))
            if fn in self.functions and rng.random() < 0.5:
                del self.functions[fn]
            else:
                self.functions[fn] = (f"ck-{fn}-r{rng.randrange(3)}", rng.choice((1, 2)) * GB)
        elif kind == 6:
            self.bandwidths[node] = {"store": rng.choice((0.2e9, 2e9))}
        # kind 7: nothing changed

    def inputs(self) -> dict[str, Any]:
        """The keyword arguments of both snapshot builds."""
        return {
            "functions": self.functions,
            "bandwidths": self.bandwidths,
            "migration": {"ck-1": MigrationFit(0.001, 0.5)},
            "reclaim_idle": True,
            "protected": self.protected,
        }

    def fresh(self) -> ClusterSnapshot:
        return snapshot_from_heartbeats(self.heartbeats, self.reserved, **self.inputs())

    def cached(self, cache: SnapshotCache) -> ClusterSnapshot:
        return cache.snapshot(self.heartbeats, self.reserved, **self.inputs())


def requests() -> list[PlacementRequest]:
    out = [PlacementRequest(fn, ck, nbytes) for fn, (ck, nbytes) in FUNCTIONS.items()]
    return [*out, PlacementRequest("f0", *FUNCTIONS["f0"], accelerators=2)]


@pytest.mark.parametrize("seed", range(5))
def test_decisions_from_the_cache_equal_those_from_a_full_build(seed: int) -> None:
    rng = random.Random(seed)
    world = World(rng)
    cache = SnapshotCache()
    decided: dict[str, int] = {}
    for _ in range(150):
        world.step()
        fresh, cached = world.fresh(), world.cached(cache)
        assert cached.nodes == fresh.nodes
        assert list(cached.free) == list(fresh.free)
        assert {k: set(v) for k, v in cached.holders.items()} == {
            k: set(v) for k, v in fresh.holders.items()
        }
        for policy in POLICIES:
            for i, req in enumerate(requests()):
                want = place(fresh, req, policy, rng_seed=i)
                assert place(cached, req, policy, rng_seed=i) == want
                decided[type(want).__name__] = decided.get(type(want).__name__, 0) + 1
    assert set(decided) == {"Placement", "NoCapacity"}  # both outcomes were exercised


def test_protected_instances_are_busy_and_a_change_rebuilds_only_their_node() -> None:
    world = World(random.Random(7))
    hb = next(hb for hb in world.heartbeats.values() if hb.instances)
    inst = replace(hb.instances[0], state="ready", in_flight=0)
    world.heartbeats[hb.node_id] = replace(hb, instances=[inst, *hb.instances[1:]])
    cache = SnapshotCache()
    world.cached(cache)
    world.protected = {inst.instance_id}
    view = world.cached(cache).nodes[hb.node_id]
    assert cache.rebuilt == 1
    (shown,) = [i for i in view.instances if i.instance_id == inst.instance_id]
    assert shown.in_flight == 1 and not shown.idle
    world.cached(cache)
    assert cache.rebuilt == 0


def test_the_gateway_scheduler_reuses_node_views_between_decisions() -> None:
    world = World(random.Random(3))
    scheduler = PolicyScheduler("locality+migration")
    beats = list(world.heartbeats.values())
    booked = {(n, d) for n, devices in world.reserved.items() for d in devices}
    protected = set(world.instance_ids()[:2])
    request = requests()[0]
    args: tuple[Any, ...] = (beats, booked, world.functions, request)
    first = scheduler.place(*args, protected=protected)
    cache: SnapshotCache = scheduler._snapshots
    assert cache.rebuilt == len(beats)
    assert scheduler.place(*args, protected=set(protected)) == first
    assert cache.rebuilt == 0
    # one node reports again: only its view is rebuilt, and the decision is a fresh build's
    beats[0] = replace(beats[0], seq=beats[0].seq + 1, load_queue_s=9.0)
    by_node = {hb.node_id: hb for hb in beats}
    fresh = snapshot_from_heartbeats(
        by_node,
        {},
        functions=world.functions,
        migration=scheduler.migration.fits(),
        reclaim_idle=True,
        protected=protected,
    )
    assert scheduler.place(*args, protected=protected) == place(
        fresh, request, "locality+migration"
    )
    assert cache.rebuilt == 1
