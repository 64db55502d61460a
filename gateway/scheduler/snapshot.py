"""Build a ClusterSnapshot from the nodes' latest heartbeats (pure: data in, data out).

``snapshot_from_heartbeats`` builds everything each call (fine for tens of nodes).
``SnapshotCache`` gives the same snapshot but rebuilds only the nodes whose inputs changed
since its last call and keeps the checkpoint index up to date in place, for 1,000 nodes (the
gateway's scheduler uses it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from gateway.scheduler.types import (
    ClusterSnapshot,
    MigrationFit,
    NodeView,
    RunningInstance,
    nodes_with_room,
)
from sllm.messages import NodeHeartbeat

# Instance states whose requests can be moved by a token-based migration.
_MIGRATABLE_STATES = frozenset({"ready"})
_CACHE_TIERS = ("dram", "ssd")


def snapshot_from_heartbeats(
    heartbeats: Mapping[str, NodeHeartbeat],
    reserved: Mapping[str, Collection[str]] | None = None,
    *,
    functions: Mapping[str, tuple[str, int]] | None = None,
    bandwidths: Mapping[str, Mapping[str, float]] | None = None,
    migration: Mapping[str, MigrationFit] | None = None,
    reclaim_idle: bool = False,
    protected: Collection[str] = (),
) -> ClusterSnapshot:
    """The cluster as the scheduler sees it.

    ``heartbeats``: node id -> its latest heartbeat. ``reserved``: node id -> devices already
    booked by loads sent but not yet visible in a heartbeat; they are never offered again, so
    one accelerator is never booked twice. ``functions``: function name -> (checkpoint key,
    bytes) from the registry, so running instances can be weighed as migration victims (an
    instance of an unknown function is never migrated). ``bandwidths``: node id -> {tier:
    bytes/s} learned by the gateway (estimators.BandwidthModel.table()); they override what the
    node reported. ``migration``: checkpoint key -> fitted resume model. ``reclaim_idle``: an
    instance with nothing in flight may be stopped to free its device (keep-alive is then a
    preference, not a reservation). ``protected``: instance ids shown busy (at least one
    request in flight) whatever their heartbeat says, so they are never reclaimed as idle (the
    gateway has requests in flight on them, or their function is at its minimum).
    """
    reserved = reserved or {}
    functions = functions or {}
    bandwidths = bandwidths or {}
    protected = frozenset(protected)
    nodes = [
        node_view(
            node_id,
            hb,
            reserved.get(node_id, ()),
            functions,
            bandwidths.get(node_id, {}),
            reclaim_idle,
            protected,
        )
        for node_id, hb in heartbeats.items()
    ]
    return ClusterSnapshot.build(nodes, migration=migration)


def node_view(
    node_id: str,
    hb: NodeHeartbeat,
    booked: Collection[str],
    functions: Mapping[str, tuple[str, int]],
    learned: Mapping[str, float],
    reclaim_idle: bool,
    protected: Collection[str] = (),
) -> NodeView:
    """One node's view from its heartbeat (see snapshot_from_heartbeats for the arguments)."""
    booked = set(booked)
    free = tuple(d.device for d in hb.devices if d.instance_id is None and d.device not in booked)
    busy = tuple(d.device for d in hb.devices if d.device not in free)
    devices_of: dict[str, list[str]] = {}
    for d in hb.devices:
        if d.instance_id is not None:
            devices_of.setdefault(d.instance_id, []).append(d.device)
    instances: list[RunningInstance] = []
    for inst in hb.instances:
        if inst.state in ("stopped", "failed"):
            continue
        known = functions.get(inst.function)
        devices = tuple(devices_of.get(inst.instance_id, [inst.device]))
        if any(dev in booked for dev in devices):
            continue  # a pending command already owns this device (e.g. an eviction)
        in_flight = max(1, inst.in_flight) if inst.instance_id in protected else inst.in_flight
        instances.append(
            RunningInstance(
                instance_id=inst.instance_id,
                function=inst.function,
                checkpoint=known[0] if known else "",
                checkpoint_bytes=known[1] if known else 0,
                devices=devices,
                tokens_in=inst.tokens_in,
                tokens_out=inst.tokens_out,
                in_flight=in_flight,
                idle=reclaim_idle and inst.state == "ready" and in_flight == 0,
                migratable=known is not None and inst.state in _MIGRATABLE_STATES,
            )
        )
    cache = {
        tier: {e.checkpoint: e.nbytes for e in hb.cache.get(tier, [])} for tier in _CACHE_TIERS
    }
    bw = {k: v for k, v in hb.bandwidths.items() if v > 0}
    bw.update({k: v for k, v in learned.items() if v > 0})
    return NodeView(
        node_id=node_id,
        free_devices=free,
        busy_devices=busy,
        cache=cache,
        bandwidths=bw,
        load_queue_s=max(0.0, hb.load_queue_s),
        instances=tuple(instances),
    )


class SnapshotCache:
    """``snapshot_from_heartbeats`` for large clusters: node views are rebuilt only when their
    inputs change (the heartbeat object, its bookings, learned bandwidths, the registry entries
    of its instances, which of its instances are protected), and the checkpoint -> nodes index
    is updated in place.

    A heartbeat is recognised by identity: the cache keeps a reference to the one each view was
    built from (so its id cannot be reused by a newer object) and rebuilds when a node's
    heartbeat is another object, whatever its ``seq`` (a restarted node counts from 0 again).
    Heartbeats must not be mutated once passed in (they are treated as frozen values).

    The ``holders`` of a returned snapshot are shared with the cache: a snapshot is valid until
    the next ``snapshot`` call (decide, then ask again). Not thread-safe; pure otherwise.
    """

    def __init__(self) -> None:
        self._views: dict[str, tuple[NodeHeartbeat, tuple[Any, ...], NodeView]] = {}
        self._holders: dict[str, set[str]] = {}
        self.rebuilt = 0  # node views rebuilt by the last call (for metrics and tests)

    def snapshot(
        self,
        heartbeats: Mapping[str, NodeHeartbeat],
        reserved: Mapping[str, Collection[str]] | None = None,
        *,
        functions: Mapping[str, tuple[str, int]] | None = None,
        bandwidths: Mapping[str, Mapping[str, float]] | None = None,
        migration: Mapping[str, MigrationFit] | None = None,
        reclaim_idle: bool = False,
        protected: Collection[str] = (),
    ) -> ClusterSnapshot:
        """Equal to ``snapshot_from_heartbeats`` with the same arguments."""
        reserved = reserved or {}
        functions = functions or {}
        bandwidths = bandwidths or {}
        protected = protected if isinstance(protected, set | frozenset) else frozenset(protected)
        self.rebuilt = 0
        for gone in [n for n in self._views if n not in heartbeats]:
            self._index(gone, self._views.pop(gone)[2], None)
        nodes: dict[str, NodeView] = {}
        for node_id, hb in heartbeats.items():
            booked = frozenset(reserved.get(node_id, ()))
            learned = bandwidths.get(node_id, {})
            key = (
                booked,
                tuple(sorted(learned.items())),
                tuple([functions.get(i.function) for i in hb.instances]),
                reclaim_idle,
                frozenset([i.instance_id for i in hb.instances if i.instance_id in protected]),
            )
            old = self._views.get(node_id)
            if old is not None and old[0] is hb and old[1] == key:
                nodes[node_id] = old[2]
                continue
            view = node_view(node_id, hb, booked, functions, learned, reclaim_idle, protected)
            self._index(node_id, old[2] if old else None, view)
            self._views[node_id] = (hb, key, view)
            nodes[node_id] = view
            self.rebuilt += 1
        return ClusterSnapshot(
            nodes=nodes,
            holders=self._holders,
            free=nodes_with_room(nodes.values()),
            migration=dict(migration or {}),
            store_bw_max=max((n.bandwidth("store") for n in nodes.values()), default=0.0),
            dram_bw_max=max((n.bandwidth("dram") for n in nodes.values()), default=0.0),
        )

    def _index(self, node_id: str, old: NodeView | None, new: NodeView | None) -> None:
        before = _cached(old)
        after = _cached(new)
        for key in before - after:
            held = self._holders.get(key)
            if held is not None:
                held.discard(node_id)
                if not held:
                    del self._holders[key]
        for key in after - before:
            self._holders.setdefault(key, set()).add(node_id)


def _cached(view: NodeView | None) -> set[str]:
    if view is None:
        return set()
    out: set[str] = set()
    for tier in _CACHE_TIERS:
        out.update(view.cache.get(tier, {}))
    return out
