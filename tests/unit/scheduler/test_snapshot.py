"""Heartbeats to snapshot: free devices, bookings, caches, learned bandwidths, victims."""

from __future__ import annotations

from gateway.scheduler.policies import place
from gateway.scheduler.snapshot import snapshot_from_heartbeats
from gateway.scheduler.types import MigrationFit, NoCapacity, Placement, PlacementRequest
from sllm.messages import CacheEntryState, DeviceState, InstanceState, NodeHeartbeat

GB = 10**9


def heartbeat(
    node_id: str,
    *,
    gpus: int = 2,
    running: dict[str, str] | None = None,
    idle: tuple[str, ...] = (),
    dram: tuple[str, ...] = (),
) -> NodeHeartbeat:
    """``running``: device -> function with one instance "<node>-<fn>" on it."""
    running = running or {}
    devices = [
        DeviceState(
            f"cuda:{i}",
            "cuda",
            80 * GB,
            f"{node_id}-{running[f'cuda:{i}']}" if f"cuda:{i}" in running else None,
        )
        for i in range(gpus)
    ]
    instances = [
        InstanceState(
            f"{node_id}-{fn}",
            fn,
            dev,
            "ready",
            "http://127.0.0.1:1",
            0 if fn in idle else 2,
            tokens_in=300,
            tokens_out=50,
        )
        for dev, fn in running.items()
    ]
    return NodeHeartbeat(
        node_id=node_id,
        seq=1,
        devices=devices,
        instances=instances,
        cache={"dram": [CacheEntryState(f"ck-{f}", 2 * GB) for f in dram], "ssd": []},
        bandwidths={"dram": 10e9, "ssd": 2e9, "store": 1e9},
        load_queue_s=0.5,
    )


FUNCTIONS = {"chat": ("ck-chat", 2 * GB), "code": ("ck-code", 2 * GB)}


def test_views_carry_devices_cache_instances_and_bandwidths() -> None:
    hbs = {"n1": heartbeat("n1", running={"cuda:0": "chat"}, dram=("chat", "code"))}
    snap = snapshot_from_heartbeats(
        hbs,
        functions=FUNCTIONS,
        bandwidths={"n1": {"ssd": 3e9}},
        migration={"ck-chat": MigrationFit(0.001, 2.0)},
    )
    view = snap.nodes["n1"]
    assert view.free_devices == ("cuda:1",) and view.busy_devices == ("cuda:0",)
    assert view.cache["dram"] == {"ck-chat": 2 * GB, "ck-code": 2 * GB}
    assert view.bandwidth("ssd") == 3e9 and view.bandwidth("store") == 1e9
    assert view.load_queue_s == 0.5
    (inst,) = view.instances
    assert (inst.checkpoint, inst.devices, inst.tokens, inst.migratable, inst.idle) == (
        "ck-chat",
        ("cuda:0",),
        350,
        True,
        False,
    )
    assert set(snap.holders["ck-code"]) == {"n1"} and list(snap.free) == ["n1"]
    assert snap.migration_fit("ck-chat").b == 2.0


def test_reserved_devices_are_never_booked_twice() -> None:
    hbs = {"n1": heartbeat("n1", gpus=2), "n2": heartbeat("n2", gpus=3)}
    req = PlacementRequest("chat", "ck-chat", 2 * GB)
    reserved: dict[str, set[str]] = {}
    booked: list[tuple[str, str]] = []
    for _ in range(10):
        result = place(snapshot_from_heartbeats(hbs, reserved, functions=FUNCTIONS), req)
        if isinstance(result, NoCapacity):
            break
        assert isinstance(result, Placement)
        for dev in result.devices:
            booked.append((result.node, dev))
            reserved.setdefault(result.node, set()).add(dev)
    assert len(booked) == 5 and len(set(booked)) == 5


def test_unknown_functions_are_not_migrated_and_idle_is_opt_in() -> None:
    hbs = {"n1": heartbeat("n1", gpus=1, running={"cuda:0": "mystery"}, idle=("mystery",))}
    (inst,) = snapshot_from_heartbeats(hbs).nodes["n1"].instances
    assert not inst.migratable and not inst.idle
    (inst,) = snapshot_from_heartbeats(hbs, reclaim_idle=True).nodes["n1"].instances
    assert inst.idle
    assert list(snapshot_from_heartbeats(hbs, reclaim_idle=True).free) == ["n1"]
    assert list(snapshot_from_heartbeats(hbs).free) == []


def test_snapshot_cache_matches_a_full_build_and_rebuilds_only_changes() -> None:
    from gateway.scheduler.snapshot import SnapshotCache

    hbs = {
        "n1": heartbeat("n1", running={"cuda:0": "chat"}, dram=("chat",)),
        "n2": heartbeat("n2", dram=("code",)),
        "n3": heartbeat("n3", gpus=1, running={"cuda:0": "code"}),
    }
    cache = SnapshotCache()
    snap = cache.snapshot(hbs, functions=FUNCTIONS)
    full = snapshot_from_heartbeats(hbs, functions=FUNCTIONS)
    assert snap.nodes == full.nodes and list(snap.free) == list(full.free)
    assert {k: set(v) for k, v in snap.holders.items()} == {
        k: set(v) for k, v in full.holders.items()
    }
    assert cache.rebuilt == 3
    cache.snapshot(hbs, functions=FUNCTIONS)
    assert cache.rebuilt == 0
    # n2 reports again with chat cached instead of code; n3 leaves; n1 gets a booking.
    hbs2 = {"n1": hbs["n1"], "n2": heartbeat("n2", dram=("chat",))}
    snap = cache.snapshot(hbs2, {"n1": {"cuda:1"}}, functions=FUNCTIONS)
    assert cache.rebuilt == 2
    assert {k: set(v) for k, v in snap.holders.items()} == {"ck-chat": {"n1", "n2"}}
    assert list(snap.free) == ["n2"]
