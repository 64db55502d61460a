"""The scheduler's inputs and outputs: frozen data, no behaviour beyond lookups.

Units: bytes, bytes/s, seconds. A *source tier* is where a load reads a checkpoint from:
``dram`` (the node's shared-memory cache), ``ssd`` (the node's disk cache) or ``store`` (the
model store, reachable from every node). The best tier a node holds a checkpoint in is the first
of ``SOURCE_TIERS`` that has it; every node can always load from the store.

``ClusterSnapshot`` carries two indexes next to the nodes so a decision on 1,000 nodes does not
scan every cache: ``holders`` (checkpoint -> nodes caching it in DRAM or SSD), ``free`` (node ids
with at least one free device or idle instance) and ``store_bw_max``/``dram_bw_max`` (the fastest
links, bounds that let a scan stop at the first node reaching them). ``ClusterSnapshot.build`` computes
them; the simulator keeps them up to date itself and passes them in (``place`` only reads them).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Literal

SourceTier = Literal["dram", "ssd", "store"]
SOURCE_TIERS: tuple[SourceTier, ...] = ("dram", "ssd", "store")

# Seeds used when a node has not reported a bandwidth for a tier yet (bytes/s into the device).
# 8e9: pinned-DRAM to device over PCIe 4 x16 (~25 GB/s peak, ~8 GB/s through a shared copy
# path); 2e9: one NVMe SSD; 1.25e8: a 1 Gbit/s link to the store.
DEFAULT_BANDWIDTHS: Mapping[SourceTier, float] = {"dram": 8e9, "ssd": 2e9, "store": 1.25e8}


@dataclass(frozen=True)
class MigrationFit:
    """Resume time of a migrated instance: ``a * tokens + b`` seconds, tokens = in + out so far.

    The prior (0.5 ms per token of prefill on the target, 1 s fixed for the rounds and the
    stream switch) is used until a model has observed resumes (estimators.MigrationModel).
    """

    a: float = 5e-4
    b: float = 1.0

    def seconds(self, tokens: int) -> float:
        return self.a * tokens + self.b


@dataclass(frozen=True)
class RunningInstance:
    """An instance occupying ``devices`` on a node.

    ``idle``: it may be stopped at no cost to free its devices (no request in flight and the
    caller allows reclaiming idle instances); ``migratable``: its requests may be moved away.
    """

    instance_id: str
    function: str
    checkpoint: str
    checkpoint_bytes: int
    devices: tuple[str, ...]
    tokens_in: int = 0
    tokens_out: int = 0
    in_flight: int = 0
    idle: bool = False
    migratable: bool = True

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


@dataclass(frozen=True)
class NodeView:
    """One node as the scheduler sees it.

    ``free_devices`` excludes devices booked by pending loads; ``cache`` maps a source tier
    ("dram", "ssd") to {checkpoint key: bytes}; ``bandwidths`` maps a source tier to bytes/s
    into the device; ``load_queue_s`` is the wait before a new load on this node starts.
    ``queue_until`` (optional) is when the loads already queued end, on the snapshot's clock
    (``ClusterSnapshot.now``): the simulator sets it so a view stays true while a load runs.
    The wait is ``load_queue_s + max(0, queue_until - now)``.

    ``dram_capacity`` (bytes; 0: not known, not checked) and ``dram_pinned`` (checkpoint ->
    bytes of DRAM entries running instances hold, which the node cannot evict): a checkpoint
    not in DRAM yet needs its size free beside the pinned ones, or the load fails with
    ``cache_full`` on the node (issue 14: one function starved while another stayed warm).
    """

    node_id: str
    free_devices: tuple[str, ...]
    busy_devices: tuple[str, ...] = ()
    cache: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    bandwidths: Mapping[str, float] = field(default_factory=dict)
    load_queue_s: float = 0.0
    instances: tuple[RunningInstance, ...] = ()
    queue_until: float = 0.0
    dram_capacity: int = 0
    dram_pinned: Mapping[str, int] = field(default_factory=dict)

    def dram_short(self, checkpoint: str, nbytes: int, freed: Collection[str] = ()) -> int:
        """Bytes of DRAM missing to load ``checkpoint`` here (<= 0: it fits), once the
        instances ``freed`` (ids) have stopped and unpinned their entries."""
        if self.dram_capacity <= 0 or nbytes <= 0 or checkpoint in self.cache.get("dram", {}):
            return 0
        gone = {i.checkpoint for i in self.instances if i.instance_id in freed}
        still = {i.checkpoint for i in self.instances if i.instance_id not in freed}
        pinned = sum(n for key, n in self.dram_pinned.items() if key not in gone or key in still)
        return nbytes - (self.dram_capacity - pinned)

    def bandwidth(self, tier: SourceTier) -> float:
        bw = self.bandwidths.get(tier, 0.0)
        return bw if bw > 0 else DEFAULT_BANDWIDTHS[tier]

    def best_tier(self, checkpoint: str) -> SourceTier:
        """The fastest tier holding ``checkpoint`` here (the store when no cache has it)."""
        cache = self.cache
        dram = cache.get("dram")
        if dram is not None and checkpoint in dram:
            return "dram"
        ssd = cache.get("ssd")
        if ssd is not None and checkpoint in ssd:
            return "ssd"
        return "store"

    def has_room(self) -> bool:
        """At least one device is free or held by an idle (reclaimable) instance."""
        return bool(self.free_devices) or any(i.idle for i in self.instances)

    def wait(self, now: float) -> float:
        """Seconds before a new load on this node starts, at time ``now``."""
        late = self.queue_until - now
        return self.load_queue_s + late if late > 0 else self.load_queue_s

    def load_seconds(
        self, checkpoint: str, nbytes: int, now: float = 0.0
    ) -> tuple[SourceTier, float]:
        """(tier, queue wait + nbytes / bandwidth of that tier)."""
        tier = self.best_tier(checkpoint)
        return tier, self.wait(now) + nbytes / self.bandwidth(tier)


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every node at one moment, plus the indexes ``place`` reads and the migration fits.

    ``migration`` maps a checkpoint key to its fitted resume-time model; ``default_migration``
    is used for checkpoints without one. ``store_bw_max`` must be >= every node's store
    bandwidth (0 disables the early stop), ``dram_bw_max`` likewise for DRAM. ``now`` is the time ``NodeView.queue_until`` is
    measured against. ``free`` is scanned in order: shortest queue first finds the best store
    load soonest (``build`` sorts it so); membership tests on it must be O(1) (dict keys, a
    set), as on the ``holders`` sets.
    """

    nodes: Mapping[str, NodeView]
    holders: Mapping[str, Collection[str]]
    free: Collection[str]
    migration: Mapping[str, MigrationFit] = field(default_factory=dict)
    default_migration: MigrationFit = MigrationFit()
    store_bw_max: float = 0.0
    now: float = 0.0
    dram_bw_max: float = 0.0

    @classmethod
    def build(
        cls,
        nodes: Collection[NodeView],
        migration: Mapping[str, MigrationFit] | None = None,
        default_migration: MigrationFit | None = None,
    ) -> ClusterSnapshot:
        """A snapshot with its indexes computed from ``nodes`` (node ids must be unique)."""
        by_id: dict[str, NodeView] = {}
        holders: dict[str, set[str]] = {}
        for node in nodes:
            if node.node_id in by_id:
                raise ValueError(f"node {node.node_id!r} appears twice in the snapshot")
            by_id[node.node_id] = node
            for tier in ("dram", "ssd"):
                for checkpoint in node.cache.get(tier, {}):
                    holders.setdefault(checkpoint, set()).add(node.node_id)
        return cls(
            nodes=by_id,
            holders={k: frozenset(v) for k, v in holders.items()},
            free=nodes_with_room(by_id.values()),
            migration=dict(migration or {}),
            default_migration=default_migration or MigrationFit(),
            store_bw_max=max((n.bandwidth("store") for n in by_id.values()), default=0.0),
            dram_bw_max=max((n.bandwidth("dram") for n in by_id.values()), default=0.0),
        )

    def migration_fit(self, checkpoint: str) -> MigrationFit:
        return self.migration.get(checkpoint, self.default_migration)


def nodes_with_room(nodes: Iterable[NodeView]) -> KeysView[str]:
    """Ids of the nodes with room, shortest load queue first (ordered, O(1) membership)."""
    ordered = sorted(nodes, key=lambda n: n.wait(0.0))
    return dict.fromkeys(n.node_id for n in ordered if n.has_room()).keys()


@dataclass(frozen=True)
class PlacementRequest:
    """One new instance of ``function`` needing ``accelerators`` devices on one node."""

    function: str
    checkpoint: str
    checkpoint_bytes: int
    accelerators: int = 1


@dataclass(frozen=True)
class Migration:
    """Move running instance ``victim`` (of ``victim_function``) from ``source_node`` to
    ``target_devices`` on ``target_node`` first, freeing ``freed_devices`` for the new instance.
    ``estimated_s``: target load of the victim's checkpoint + resume (a * tokens + b)."""

    victim: str
    victim_function: str
    source_node: str
    freed_devices: tuple[str, ...]
    target_node: str
    target_devices: tuple[str, ...]
    target_tier: SourceTier
    estimated_s: float


@dataclass(frozen=True)
class Placement:
    """Load the checkpoint on ``devices`` of ``node`` from ``tier``; ready in ``estimated_s``.

    ``evict``: idle instances on ``node`` to stop first (their devices are part of ``devices``).
    ``migration``: a running instance to move away first (its freed devices are in ``devices``);
    ``estimated_s`` then includes the migration. ``estimates``: the best candidates considered,
    (node, tier, seconds) sorted by seconds, for logs and metrics.
    """

    node: str
    devices: tuple[str, ...]
    tier: SourceTier
    estimated_s: float
    policy: str
    estimates: tuple[tuple[str, SourceTier, float], ...] = ()
    evict: tuple[str, ...] = ()
    migration: Migration | None = None


@dataclass(frozen=True)
class NoCapacity:
    """No node can host the request without over-committing a device; ``reason`` says why."""

    reason: str
