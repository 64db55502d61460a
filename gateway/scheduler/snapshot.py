"""Build a ClusterSnapshot from the nodes' latest heartbeats (pure: data in, data out).

``snapshot_from_heartbeats`` builds everything each call (fine for tens of nodes).
``SnapshotCache`` gives the same snapshot but rebuilds only the nodes whose inputs changed
since its last call and keeps the checkpoint index up to date in place, for 1,000 nodes (the
gateway's scheduler uses it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.scheduler.types import (
    ClusterSnapshot,
    MigrationFit,
    NodeView,
    RunningInstance,
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
        dram_capacity=max(0, hb.cache_capacity.get("dram", 0)),
        dram_pinned={e.checkpoint: e.nbytes for e in hb.cache.get("dram", []) if e.in_use},
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
        self._views: dict[str, _Entry] = {}
        # The registry and protected set of the last call: when equal this time (one
        # comparison), an unchanged heartbeat's share of them is unchanged too.
        self._functions: dict[str, tuple[str, int]] = {}
        self._protected: frozenset[str] = frozenset()
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
        protected = frozenset(protected)
        same_functions = functions == self._functions
        same_protected = protected == self._protected
        self.rebuilt = 0
        for gone in [n for n in self._views if n not in heartbeats]:
            self._index(gone, self._views.pop(gone).view, None)
        nodes: dict[str, NodeView] = {}
        entries: list[_Entry] = []
        for node_id, hb in heartbeats.items():
            booked = frozenset(reserved[node_id]) if node_id in reserved else _NONE
            learned = bandwidths.get(node_id, {})
            local = (booked, tuple(sorted(learned.items())) if learned else (), reclaim_idle)
            old = self._views.get(node_id)
            if old is not None and old.heartbeat is hb and old.inputs.local == local:
                inputs = old.inputs
                if not same_functions:
                    inputs = replace(inputs, functions=_functions_of(hb, functions))
                if not same_protected:
                    inputs = replace(inputs, protected=_protected_on(hb, protected))
                if inputs is old.inputs or inputs == old.inputs:
                    nodes[node_id] = old.view
                    entries.append(old)
                    continue
            else:
                inputs = _Inputs(local, _functions_of(hb, functions), _protected_on(hb, protected))
            view = node_view(node_id, hb, booked, functions, learned, reclaim_idle, protected)
            self._index(node_id, old.view if old else None, view)
            entry = _Entry(hb, inputs, view)
            self._views[node_id] = entry
            nodes[node_id] = view
            entries.append(entry)
            self.rebuilt += 1
        if not same_functions:
            self._functions = dict(functions)
        self._protected = protected
        # as nodes_with_room: filtering, then a stable sort on the wait, keeps the same order
        with_room = sorted((e for e in entries if e.room), key=lambda e: e.wait)
        return ClusterSnapshot(
            nodes=nodes,
            holders=self._holders,
            free=dict.fromkeys(e.view.node_id for e in with_room).keys(),
            migration=dict(migration or {}),
            store_bw_max=max((e.store_bw for e in entries), default=0.0),
            dram_bw_max=max((e.dram_bw for e in entries), default=0.0),
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


_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Inputs:
    """What a node's view depends on besides its heartbeat: ``local`` = (its booked devices,
    its learned bandwidths, reclaim_idle); the registry entries of its instances' functions;
    which of its instances are protected."""

    local: tuple[Any, ...]
    functions: tuple[tuple[str, int] | None, ...]
    protected: frozenset[str]


class _Entry:
    """A node's view, the heartbeat and other inputs it was built from, and what each
    snapshot reads of it (computed once per view)."""

    __slots__ = ("dram_bw", "heartbeat", "inputs", "room", "store_bw", "view", "wait")

    def __init__(self, heartbeat: NodeHeartbeat, inputs: _Inputs, view: NodeView) -> None:
        self.heartbeat, self.inputs, self.view = heartbeat, inputs, view
        self.store_bw = view.bandwidth("store")
        self.dram_bw = view.bandwidth("dram")
        self.wait = view.wait(0.0)
        self.room = view.has_room()


def _functions_of(
    hb: NodeHeartbeat, functions: Mapping[str, tuple[str, int]]
) -> tuple[tuple[str, int] | None, ...]:
    return tuple([functions.get(i.function) for i in hb.instances])


def _protected_on(hb: NodeHeartbeat, protected: frozenset[str]) -> frozenset[str]:
    return frozenset([i.instance_id for i in hb.instances if i.instance_id in protected])


def _cached(view: NodeView | None) -> set[str]:
    if view is None:
        return set()
    out: set[str] = set()
    for tier in _CACHE_TIERS:
        out.update(view.cache.get(tier, {}))
    return out
