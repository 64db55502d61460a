"""``place(snapshot, request, policy) -> Placement | NoCapacity``: pure placement decisions.

Policies:
- ``random``: any node with room, uniformly (seeded); loads from that node's best tier.
- ``least-loaded``: the node with the most room (ties: shorter load queue, then node order).
- ``locality``: the node with the least estimated time-to-ready, ``q + size / bw(best tier)``.
- ``locality+migration`` (default): as ``locality``, and also weighs freeing a device on a node
  that caches the checkpoint in a faster tier by migrating a running instance away; it migrates
  only when that is strictly faster than the best free placement.
- ``download-every-time``: the baseline of Ray Serve / KServe: least-loaded node, always
  loading from the store (no cache is consulted).

A node has room when it has free devices, or devices held by idle instances that may be stopped
(``RunningInstance.idle``); stopping one adds ``EVICT_S`` to the estimate so a free device wins
a tie and warm instances are kept when possible. Never offers a device twice: the devices of a
placement are distinct, migration targets are on another node, and the snapshot already
excludes devices booked by pending loads.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from gateway.scheduler.types import (
    ClusterSnapshot,
    Migration,
    NoCapacity,
    NodeView,
    Placement,
    PlacementRequest,
    RunningInstance,
    SourceTier,
)
from sllm.errors import InvalidInput
from sllm.settings import DEFAULT_POLICY, POLICIES

# 0.2 s: stopping an idle instance (drain nothing, free device memory) before loading.
EVICT_S = 0.2
# Candidates kept in Placement.estimates for logs.
_KEEP = 5
# Caching nodes weighed as migration sources per decision (those with the shortest load):
# bounds a decision on 1,000 nodes; past the first few dozen, equally fast sources add nothing.
MAX_SOURCES = 32

Candidate = tuple[str, SourceTier, float]


def place(
    snapshot: ClusterSnapshot,
    request: PlacementRequest,
    policy: str = DEFAULT_POLICY,
    rng_seed: int | None = None,
) -> Placement | NoCapacity:
    """Choose a node and devices for one new instance; never over-commits a device."""
    if request.accelerators < 1:
        raise InvalidInput(f"accelerators must be >= 1, got {request.accelerators}")
    if request.checkpoint_bytes < 0:
        raise InvalidInput(f"checkpoint_bytes must be >= 0, got {request.checkpoint_bytes}")
    if policy == "locality" or policy == "locality+migration":
        return _locality(snapshot, request, policy, migrate=policy == "locality+migration")
    if policy == "random":
        return _random(snapshot, request, rng_seed)
    if policy == "least-loaded" or policy == "download-every-time":
        return _least_loaded(snapshot, request, policy)
    raise InvalidInput(f"unknown scheduling policy {policy!r}; choose one of {', '.join(POLICIES)}")


def room(
    node: NodeView, n: int, checkpoint: str = "", nbytes: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(devices, idle instances to stop) giving ``n`` devices on ``node``, and DRAM for
    ``checkpoint`` (``nbytes``) beside the entries running instances pin, or None.

    Free devices come first; idle instances are stopped in the order the node lists them,
    those whose stopping frees DRAM the checkpoint needs first when DRAM is short.
    """
    free = node.free_devices
    if len(free) >= n and node.dram_short(checkpoint, nbytes) <= 0:
        return free[:n], ()
    devices = list(free)
    evict: list[str] = []
    idle = [i for i in node.instances if i.idle]
    if node.dram_short(checkpoint, nbytes) > 0:
        idle.sort(key=lambda i: i.checkpoint not in node.dram_pinned)  # stable: DRAM first
    for inst in idle:
        devices.extend(inst.devices)
        evict.append(inst.instance_id)
        if len(devices) >= n and node.dram_short(checkpoint, nbytes, evict) <= 0:
            return tuple(devices[:n]), tuple(evict)
    return None


def _no_room(snapshot: ClusterSnapshot, request: PlacementRequest) -> NoCapacity:
    return NoCapacity(
        f"no node has {request.accelerators} free accelerator(s) for {request.function!r} "
        f"({len(snapshot.nodes)} node(s), {len(snapshot.free)} with any free)"
    )


def _keep(best: list[Candidate], cand: Candidate) -> None:
    """Insert ``cand`` into the sorted top-_KEEP list ``best``."""
    if len(best) >= _KEEP and cand[2] >= best[-1][2]:
        return
    i = len(best)
    while i > 0 and best[i - 1][2] > cand[2]:
        i -= 1
    best.insert(i, cand)
    del best[_KEEP:]


def best_load(
    snapshot: ClusterSnapshot,
    checkpoint: str,
    nbytes: int,
    n: int,
    *,
    exclude: str | None = None,
    allow_evict: bool = True,
    top: list[Candidate] | None = None,
) -> tuple[str, SourceTier, float, tuple[str, ...], tuple[str, ...]] | None:
    """The node with room for ``n`` devices where ``checkpoint`` is ready soonest.

    Returns (node, tier, seconds, devices, evict) or None. Caching nodes are weighed first;
    the store scan then stops at the first node that reaches the store lower bound
    ``nbytes / store_bw_max`` (no node can load from the store faster).
    """
    nodes = snapshot.nodes
    now = snapshot.now
    found: tuple[str, SourceTier, float, tuple[str, ...], tuple[str, ...]] | None = None
    best_t = float("inf")
    holders = snapshot.holders.get(checkpoint, ())
    free = snapshot.free
    # Only caching nodes with room count: walk whichever of the two sets is smaller, in a
    # fixed order (a set's order varies between processes), and stop at the first node that
    # loads from DRAM at the fastest DRAM bandwidth with no queue: none can be sooner.
    cached = sorted(holders) if len(holders) <= len(free) else [x for x in free if x in holders]
    dram_bound = nbytes / snapshot.dram_bw_max if snapshot.dram_bw_max > 0 else -1.0
    for node_id in cached:
        if node_id == exclude:
            continue
        node = nodes[node_id]
        r = (
            room(node, n, checkpoint, nbytes)
            if allow_evict
            else _free_only(node, n, checkpoint, nbytes)
        )
        if r is None:
            continue
        tier, t = node.load_seconds(checkpoint, nbytes, now)
        t += EVICT_S * len(r[1])
        if top is not None:
            _keep(top, (node_id, tier, t))
        if t < best_t:
            best_t, found = t, (node_id, tier, t, r[0], r[1])
            if t <= dram_bound:
                break
    bound = nbytes / snapshot.store_bw_max if snapshot.store_bw_max > 0 else -1.0
    if best_t <= bound:
        return found
    for node_id in free:
        if node_id == exclude or node_id in holders:
            continue
        node = nodes[node_id]
        q = node.wait(now)
        if q >= best_t:
            continue
        r = (
            room(node, n, checkpoint, nbytes)
            if allow_evict
            else _free_only(node, n, checkpoint, nbytes)
        )
        if r is None:
            continue
        t = q + nbytes / node.bandwidth("store") + EVICT_S * len(r[1])
        if top is not None:
            _keep(top, (node_id, "store", t))
        if t < best_t:
            best_t, found = t, (node_id, "store", t, r[0], r[1])
            if t <= bound:
                break
    return found


def _free_only(
    node: NodeView, n: int, checkpoint: str = "", nbytes: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    free = node.free_devices
    if len(free) < n or node.dram_short(checkpoint, nbytes) > 0:
        return None
    return free[:n], ()


def _locality(
    snapshot: ClusterSnapshot, request: PlacementRequest, policy: str, *, migrate: bool
) -> Placement | NoCapacity:
    top: list[Candidate] = []
    found = best_load(
        snapshot, request.checkpoint, request.checkpoint_bytes, request.accelerators, top=top
    )
    placement: Placement | None = None
    if found is not None:
        node_id, tier, t, devices, evict = found
        placement = Placement(node_id, devices, tier, t, policy, tuple(top), evict)
    if migrate:
        moved = _best_migration(snapshot, request, placement.estimated_s if placement else None)
        if moved is not None:
            return Placement(
                moved.source_node,
                moved_devices(snapshot.nodes[moved.source_node], moved, request.accelerators),
                snapshot.nodes[moved.source_node].best_tier(request.checkpoint),
                _migration_total(snapshot, request, moved),
                policy,
                tuple(top),
                (),
                moved,
            )
    return placement if placement is not None else _no_room(snapshot, request)


def moved_devices(node: NodeView, moved: Migration, n: int) -> tuple[str, ...]:
    """The new instance's devices on the source: its free devices, then the freed ones."""
    return (node.free_devices + moved.freed_devices)[:n]


def _migration_total(snapshot: ClusterSnapshot, request: PlacementRequest, m: Migration) -> float:
    _, load = snapshot.nodes[m.source_node].load_seconds(
        request.checkpoint, request.checkpoint_bytes, snapshot.now
    )
    return m.estimated_s + load


def _best_migration(
    snapshot: ClusterSnapshot, request: PlacementRequest, beat_s: float | None
) -> Migration | None:
    """The migration that makes the request ready soonest, if it beats ``beat_s`` strictly.

    Sources are nodes caching the checkpoint without room for it; victims are migratable busy
    instances there whose devices complete the request's. Total = target load of the victim
    + its resume (a * tokens + b) + the request's load on the source. Work stays bounded on
    1,000 nodes: only the ``MAX_SOURCES`` sources with the shortest load are weighed; victims
    are tried in order of their lower bound (source load + resume) until it cannot win; a
    victim checkpoint's best target is searched once per decision.
    """
    nodes = snapshot.nodes
    n = request.accelerators
    limit = float("inf") if beat_s is None else beat_s
    if snapshot.dram_bw_max > 0 and limit <= request.checkpoint_bytes / snapshot.dram_bw_max:
        return None  # already as fast as any load can be: nothing to gain
    free = snapshot.free
    sources: list[tuple[float, str]] = []
    for node_id in snapshot.holders.get(request.checkpoint, ()):
        node = nodes[node_id]
        if node_id in free and room(node, n, request.checkpoint, request.checkpoint_bytes):
            continue  # it has room: best_load already weighed it
        _, load = node.load_seconds(request.checkpoint, request.checkpoint_bytes, snapshot.now)
        if load < limit:
            sources.append((load, node_id))
    if not sources:
        return None
    sources.sort()
    bounds: list[tuple[float, str, str, RunningInstance]] = []
    for load, node_id in sources[:MAX_SOURCES]:
        node = nodes[node_id]
        spare = len(node.free_devices)
        for inst in node.instances:
            if not inst.migratable or inst.idle or not inst.checkpoint:
                continue
            if spare + len(inst.devices) < n:
                continue
            short = node.dram_short(
                request.checkpoint, request.checkpoint_bytes, [inst.instance_id]
            )
            if short > 0:
                continue  # even with the victim gone the checkpoint would not fit in DRAM
            lower = load + snapshot.migration_fit(inst.checkpoint).seconds(inst.tokens)
            if lower < limit:
                bounds.append((lower, node_id, inst.instance_id, inst))
    bounds.sort(key=lambda b: b[:3])
    best: Migration | None = None
    targets: dict[tuple[str, int, str], _Target | None] = {}
    for lower, node_id, _, inst in bounds:
        if lower >= limit:
            break
        target = _target(snapshot, targets, inst, node_id)
        if target is None:
            continue
        target_node, target_tier, target_s, target_devices = target
        total = lower + target_s
        if total < limit:
            limit = total
            resume = snapshot.migration_fit(inst.checkpoint).seconds(inst.tokens)
            best = Migration(
                victim=inst.instance_id,
                victim_function=inst.function,
                source_node=node_id,
                freed_devices=inst.devices,
                target_node=target_node,
                target_devices=target_devices,
                target_tier=target_tier,
                estimated_s=target_s + resume,
            )
    return best


_Target = tuple[str, SourceTier, float, tuple[str, ...]]


def _target(
    snapshot: ClusterSnapshot,
    memo: dict[tuple[str, int, str], _Target | None],
    inst: RunningInstance,
    source: str,
) -> _Target | None:
    """Where ``inst`` would be ready soonest off ``source`` (free devices only: a target never
    stops another instance). Memoized per checkpoint; searched again without the best node
    only when that node is the source itself."""
    ndev = len(inst.devices)
    key = (inst.checkpoint, ndev, "")
    if key not in memo:
        memo[key] = _search_target(snapshot, inst, ndev, None)
    hit = memo[key]
    if hit is not None and hit[0] == source:
        key = (inst.checkpoint, ndev, source)
        if key not in memo:
            memo[key] = _search_target(snapshot, inst, ndev, source)
        hit = memo[key]
    return hit


def _search_target(
    snapshot: ClusterSnapshot, inst: RunningInstance, ndev: int, exclude: str | None
) -> _Target | None:
    hit = best_load(
        snapshot, inst.checkpoint, inst.checkpoint_bytes, ndev, exclude=exclude, allow_evict=False
    )
    return None if hit is None else (hit[0], hit[1], hit[2], hit[3])


def _feasible(
    snapshot: ClusterSnapshot, request: PlacementRequest
) -> list[tuple[NodeView, tuple[str, ...], tuple[str, ...]]]:
    out = []
    for node_id in snapshot.free:
        node = snapshot.nodes[node_id]
        r = room(node, request.accelerators, request.checkpoint, request.checkpoint_bytes)
        if r is not None:
            out.append((node, r[0], r[1]))
    return out


def _random(
    snapshot: ClusterSnapshot, request: PlacementRequest, rng_seed: int | None
) -> Placement | NoCapacity:
    options = _feasible(snapshot, request)
    if not options:
        return _no_room(snapshot, request)
    node, devices, evict = random.Random(rng_seed).choice(options)
    tier, t = node.load_seconds(request.checkpoint, request.checkpoint_bytes, snapshot.now)
    t += EVICT_S * len(evict)
    return Placement(node.node_id, devices, tier, t, "random", ((node.node_id, tier, t),), evict)


def _least_loaded(
    snapshot: ClusterSnapshot, request: PlacementRequest, policy: str
) -> Placement | NoCapacity:
    now = snapshot.now
    best: tuple[int, float] | None = None
    chosen: tuple[NodeView, tuple[str, ...], tuple[str, ...]] | None = None
    for node, devices, evict in _feasible(snapshot, request):
        score = (-(len(node.free_devices) + _idle_devices(node.instances)), node.wait(now))
        if best is None or score < best:
            best, chosen = score, (node, devices, evict)
    if chosen is None:
        return _no_room(snapshot, request)
    node, devices, evict = chosen
    if policy == "download-every-time":
        tier: SourceTier = "store"
        t = node.wait(now) + request.checkpoint_bytes / node.bandwidth("store")
    else:
        tier, t = node.load_seconds(request.checkpoint, request.checkpoint_bytes, now)
    t += EVICT_S * len(evict)
    return Placement(node.node_id, devices, tier, t, policy, ((node.node_id, tier, t),), evict)


def _idle_devices(instances: Collection[RunningInstance]) -> int:
    return sum(len(i.devices) for i in instances if i.idle)
