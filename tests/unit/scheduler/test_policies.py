"""Placement decisions as tables: which node, which tier, when to migrate, when to refuse."""

from __future__ import annotations

import pytest

from gateway.scheduler.policies import POLICIES, place
from gateway.scheduler.types import (
    ClusterSnapshot,
    MigrationFit,
    NoCapacity,
    NodeView,
    Placement,
    PlacementRequest,
    RunningInstance,
)
from sllm.errors import InvalidInput

GB = 10**9
BW = {"dram": 10 * GB, "ssd": 2 * GB, "store": 0.5 * GB}


def node(
    node_id: str,
    free: int = 1,
    *,
    dram: dict[str, int] | None = None,
    ssd: dict[str, int] | None = None,
    queue: float = 0.0,
    instances: tuple[RunningInstance, ...] = (),
) -> NodeView:
    """A node with ``free`` free devices (named after the busy ones of its instances)."""
    busy = tuple(d for inst in instances for d in inst.devices)
    return NodeView(
        node_id=node_id,
        free_devices=tuple(f"gpu{len(busy) + i}" for i in range(free)),
        busy_devices=busy,
        cache={"dram": dram or {}, "ssd": ssd or {}},
        bandwidths=BW,
        load_queue_s=queue,
        instances=instances,
    )


def running(
    instance_id: str,
    checkpoint: str,
    nbytes: int = 2 * GB,
    *,
    devices: tuple[str, ...] = ("gpu0",),
    tokens: int = 100,
    idle: bool = False,
    migratable: bool = True,
) -> RunningInstance:
    return RunningInstance(
        instance_id=instance_id,
        function=f"fn-{checkpoint}",
        checkpoint=checkpoint,
        checkpoint_bytes=nbytes,
        devices=devices,
        tokens_in=tokens // 2,
        tokens_out=tokens - tokens // 2,
        in_flight=0 if idle else 1,
        idle=idle,
        migratable=migratable,
    )


def request(checkpoint: str = "x", nbytes: int = 4 * GB, accelerators: int = 1) -> PlacementRequest:
    return PlacementRequest(f"fn-{checkpoint}", checkpoint, nbytes, accelerators)


def placed(result: Placement | NoCapacity) -> Placement:
    assert isinstance(result, Placement), result
    return result


@pytest.mark.parametrize(
    ("nodes", "want_node", "want_tier", "want_s"),
    [
        # DRAM beats SSD beats store, whatever the order of the nodes.
        (
            [node("a"), node("b", ssd={"x": 4 * GB}), node("c", dram={"x": 4 * GB})],
            "c",
            "dram",
            0.4,
        ),
        (
            [node("c", dram={"x": 4 * GB}), node("b", ssd={"x": 4 * GB}), node("a")],
            "c",
            "dram",
            0.4,
        ),
        ([node("a"), node("b", ssd={"x": 4 * GB})], "b", "ssd", 2.0),
        ([node("a"), node("b")], "a", "store", 8.0),
        # A node caching it in both tiers loads from DRAM.
        ([node("a", dram={"x": 4 * GB}, ssd={"x": 4 * GB})], "a", "dram", 0.4),
        # Queue wait counts: DRAM behind a 5 s queue loses to SSD now (5.4 s > 2 s).
        ([node("c", dram={"x": 4 * GB}, queue=5.0), node("b", ssd={"x": 4 * GB})], "b", "ssd", 2.0),
        # ... but not to the store (5.4 s < 8 s).
        ([node("c", dram={"x": 4 * GB}, queue=5.0), node("a")], "c", "dram", 5.4),
        # Between two store loads, the shorter queue.
        ([node("a", queue=3.0), node("b", queue=1.0)], "b", "store", 9.0),
        # A caching node without a free device is not a candidate for plain locality.
        ([node("c", free=0, dram={"x": 4 * GB}), node("a")], "a", "store", 8.0),
    ],
)
def test_locality_picks_the_soonest_ready_node(
    nodes: list[NodeView], want_node: str, want_tier: str, want_s: float
) -> None:
    for policy in ("locality", "locality+migration"):
        result = placed(place(ClusterSnapshot.build(nodes), request(), policy))
        assert (result.node, result.tier) == (want_node, want_tier)
        assert result.estimated_s == pytest.approx(want_s)
        assert result.migration is None
        assert result.estimates[0][0] == want_node


def test_estimates_are_sorted_and_bounded_for_logs() -> None:
    nodes = [node(f"n{i}", dram={"x": 4 * GB}, queue=float(i)) for i in range(8)]
    result = placed(place(ClusterSnapshot.build(nodes), request(), "locality"))
    seconds = [s for _, _, s in result.estimates]
    assert seconds == sorted(seconds) and 1 <= len(seconds) <= 5
    assert result.node == "n0"


# Source "s" caches x in DRAM but its only device runs victim v (checkpoint y, 2 GB);
# node "t" is free and caches nothing. Request x (20 GB): store on t = 40 s. Migration:
# y to t from the store 4 s + resume (5e-4 * tokens + 1) + x from DRAM on s 2 s.
@pytest.mark.parametrize(
    ("tokens", "t_ssd_x", "fit", "migrates", "want_s"),
    [
        (100, False, None, True, 4.0 + 1.05 + 2.0),
        # A long generation is costly to move: 1e6 tokens = 501 s > 40 s.
        (1_000_000, False, None, False, 40.0),
        # t caches x on SSD (10 s): migration (7.05 s) still wins ...
        (100, True, None, True, 7.05),
        # ... unless this model resumes slowly (fitted b = 5 s -> 11.05 s > 10 s).
        (100, True, MigrationFit(a=5e-4, b=5.0), False, 10.0),
    ],
)
def test_migrates_only_when_it_wins(
    tokens: int, t_ssd_x: bool, fit: MigrationFit | None, migrates: bool, want_s: float
) -> None:
    victim = running("v", "y", 2 * GB, tokens=tokens)
    nodes = [
        node("s", free=0, dram={"x": 20 * GB}, instances=(victim,)),
        node("t", ssd={"x": 20 * GB} if t_ssd_x else None),
    ]
    snap = ClusterSnapshot.build(nodes, migration={"y": fit} if fit else None)
    result = placed(place(snap, request("x", 20 * GB)))
    assert result.estimated_s == pytest.approx(want_s)
    if migrates:
        m = result.migration
        assert m is not None
        assert (m.victim, m.source_node, m.target_node, m.target_tier) == ("v", "s", "t", "store")
        assert (result.node, result.devices, result.tier) == ("s", ("gpu0",), "dram")
        assert m.freed_devices == ("gpu0",) and m.target_devices == ("gpu0",)
    else:
        assert result.migration is None and result.node == "t"
    # Plain locality never migrates.
    assert placed(place(snap, request("x", 20 * GB), "locality")).migration is None


def test_migration_needs_a_target_and_a_movable_victim() -> None:
    pinned = running("v", "y", migratable=False)
    alone = [node("s", free=0, dram={"x": 20 * GB}, instances=(running("v", "y"),))]
    assert isinstance(place(ClusterSnapshot.build(alone), request("x", 20 * GB)), NoCapacity)
    stuck = [node("s", free=0, dram={"x": 20 * GB}, instances=(pinned,)), node("t")]
    result = placed(place(ClusterSnapshot.build(stuck), request("x", 20 * GB)))
    assert result.migration is None and result.node == "t"


def test_migration_prefers_the_victim_whose_target_caches_it() -> None:
    # Two victims on s; v2's checkpoint z is in DRAM on t, so moving v2 is cheaper.
    v1 = running("v1", "y", 8 * GB, devices=("gpu0",))
    v2 = running("v2", "z", 8 * GB, devices=("gpu1",))
    nodes = [
        node("s", free=0, dram={"x": 20 * GB}, instances=(v1, v2)),
        node("t", dram={"z": 8 * GB}),
    ]
    result = placed(place(ClusterSnapshot.build(nodes), request("x", 20 * GB)))
    assert result.migration is not None and result.migration.victim == "v2"
    assert result.devices == ("gpu1",) and result.migration.target_tier == "dram"


@pytest.mark.parametrize("policy", POLICIES)
def test_no_capacity_rather_than_over_commit(policy: str) -> None:
    full = [node("a", free=0, instances=(running("v", "y", migratable=False),)), node("b", 1)]
    result = place(ClusterSnapshot.build(full), request(accelerators=2), policy, rng_seed=1)
    assert isinstance(result, NoCapacity)
    assert "2 free accelerator" in result.reason
    assert isinstance(place(ClusterSnapshot.build([]), request(), policy), NoCapacity)


@pytest.mark.parametrize("policy", POLICIES)
def test_multi_accelerator_placement_gets_distinct_devices(policy: str) -> None:
    nodes = [node("a", 1), node("b", 3, ssd={"x": 4 * GB})]
    result = placed(place(ClusterSnapshot.build(nodes), request(accelerators=2), policy, 7))
    assert result.node == "b" and len(set(result.devices)) == 2


def test_idle_instances_are_reclaimed_only_when_no_device_is_free() -> None:
    idle = running("old", "y", idle=True)
    nodes = [node("a", free=0, dram={"x": 4 * GB}, instances=(idle,)), node("b")]
    result = placed(place(ClusterSnapshot.build(nodes), request(), "locality"))
    # DRAM on a (0.4 s + 0.2 s to stop the idle instance) beats the store on b (8 s).
    assert (result.node, result.evict, result.devices) == ("a", ("old",), ("gpu0",))
    assert result.estimated_s == pytest.approx(0.6)
    # With the same tier everywhere, the free device wins and the warm instance stays.
    nodes = [node("a", free=0, instances=(idle,)), node("b")]
    result = placed(place(ClusterSnapshot.build(nodes), request(), "locality"))
    assert (result.node, result.evict) == ("b", ())


def test_random_is_seeded_and_spreads() -> None:
    snap = ClusterSnapshot.build([node(f"n{i}") for i in range(10)])
    picks = [placed(place(snap, request(), "random", rng_seed=s)).node for s in range(40)]
    again = [placed(place(snap, request(), "random", rng_seed=s)).node for s in range(40)]
    assert picks == again
    assert len(set(picks)) >= 5


def test_least_loaded_and_download_every_time() -> None:
    nodes = [node("a", 1, dram={"x": 4 * GB}), node("b", 3), node("c", 3, queue=2.0)]
    snap = ClusterSnapshot.build(nodes)
    ll = placed(place(snap, request(), "least-loaded"))
    assert (ll.node, ll.tier, ll.estimated_s) == ("b", "store", pytest.approx(8.0))
    # The baseline never reads a cache, even on a node that has it in DRAM.
    only_a = ClusterSnapshot.build([node("a", 1, dram={"x": 4 * GB})])
    dl = placed(place(only_a, request(), "download-every-time"))
    assert (dl.node, dl.tier, dl.estimated_s) == ("a", "store", pytest.approx(8.0))


@pytest.mark.parametrize(
    ("req", "policy", "message"),
    [
        (request(), "fastest", "unknown scheduling policy 'fastest'"),
        (request(accelerators=0), "locality", "accelerators must be >= 1"),
        (request(nbytes=-1), "locality", "checkpoint_bytes must be >= 0"),
    ],
)
def test_bad_input_is_named(req: PlacementRequest, policy: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        place(ClusterSnapshot.build([node("a")]), req, policy)


def test_duplicate_node_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="'a' appears twice"):
        ClusterSnapshot.build([node("a"), node("a")])


def test_migration_target_is_never_the_source_node() -> None:
    # The request needs 2 devices; s has 1 free + victim v. v's checkpoint y is in DRAM on s
    # (so s itself would be y's best target), but moving v within s frees nothing: it must
    # go to t, and the new instance gets s's free device plus v's.
    v = running("v", "y", 2 * GB, devices=("gpu0",))
    nodes = [
        node("s", free=1, dram={"x": 20 * GB, "y": 2 * GB}, instances=(v,)),
        node("t", free=1),
    ]
    result = placed(place(ClusterSnapshot.build(nodes), request("x", 20 * GB, accelerators=2)))
    m = result.migration
    assert m is not None and m.target_node == "t" and m.target_tier == "store"
    assert result.node == "s" and sorted(result.devices) == ["gpu0", "gpu1"]
    assert not set(m.target_devices) & set(result.devices) or m.target_node != result.node


# --- issue 14: placement counts DRAM space -------------------------------------------------


def dram_node(node_id: str, *instances: RunningInstance, free: int = 1) -> NodeView:
    """A node whose DRAM tier holds 3 GB, its instances' checkpoints pinned in it."""
    from dataclasses import replace

    pinned = {i.checkpoint: i.checkpoint_bytes for i in instances}
    base = node(node_id, free, dram=dict(pinned), instances=instances)
    return replace(base, dram_capacity=3 * GB, dram_pinned=pinned)


@pytest.mark.parametrize("policy", ["locality", "least-loaded", "random"])
def test_a_checkpoint_that_does_not_fit_beside_pinned_ones_goes_elsewhere(policy: str) -> None:
    busy = running("b-1", "B", 2 * GB)  # 2 of 3 GB pinned: A (2 GB) cannot fit beside it
    full = dram_node("full", busy, free=1)
    roomy = dram_node("roomy", free=1)
    request = PlacementRequest("a", "A", 2 * GB)
    result = place(ClusterSnapshot.build([full, roomy]), request, policy, rng_seed=1)
    assert isinstance(result, Placement) and result.node == "roomy"
    alone = place(ClusterSnapshot.build([full]), request, policy, rng_seed=1)
    assert isinstance(alone, NoCapacity)  # a free device alone is not room: the load would fail
    small = place(ClusterSnapshot.build([full]), PlacementRequest("s", "S", GB // 2), policy)
    assert isinstance(small, Placement) and small.node == "full"  # 0.5 GB fits beside B


def test_an_idle_instance_is_evicted_to_free_dram_not_just_devices() -> None:
    other = running("c-1", "C", 200, devices=("gpu1",), idle=True)  # frees no DRAM worth it
    warm = running("b-1", "B", 2 * GB, idle=True)
    full = dram_node("full", warm, other, free=1)
    result = place(ClusterSnapshot.build([full]), PlacementRequest("a", "A", 2 * GB), "locality")
    assert isinstance(result, Placement) and result.evict == ("b-1",)
    busy = dram_node("busy", running("b-1", "B", 2 * GB), other, free=1)
    assert isinstance(
        place(ClusterSnapshot.build([busy]), PlacementRequest("a", "A", 2 * GB), "locality"),
        NoCapacity,
    )
