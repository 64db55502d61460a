"""The Scheduler port (STYLE.md 4) and its adapter onto ``gateway.scheduler`` (pure policies).

The controller asks for a placement with the live heartbeats, the devices its own pending loads
have booked, and the registry's checkpoint sizes; the adapter builds the snapshot, applies the
configured policy. Bandwidths come from the heartbeats (each node learns its own from the
loads it runs; the gateway's ready events time command-to-ready, not the transfer alone).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol

from gateway.instances import InstanceTable
from gateway.scheduler.estimators import MigrationModels
from gateway.scheduler.policies import place
from gateway.scheduler.snapshot import SnapshotCache
from gateway.scheduler.types import NoCapacity, Placement, PlacementRequest
from sllm.messages import NodeHeartbeat
from sllm.spec import FunctionRecord

# Policies applied as another one (none today: locality+migration's migrations are applied by
# the controller through gateway.migration).
_APPLIED: dict[str, str] = {}


def protected_instances(
    table: InstanceTable, records: Iterable[FunctionRecord], placing: str = ""
) -> set[str]:
    """Instances a placement must not evict: requests in flight through this gateway, or their
    function would drop below its min (its scaler would load it straight back), or they are of
    the function being placed (stopping one to start another is a cold start for nothing)."""
    protected = {
        i.instance_id for i in table.instances.values() if i.in_flight > 0 or i.function == placing
    }
    for record in records:
        if record.spec.scale.min > 0:
            protected.update(i.instance_id for i in table.of(record.spec.name))
    return protected


class Scheduler(Protocol):
    policy: str

    def place(
        self,
        heartbeats: Sequence[NodeHeartbeat],
        reserved: Collection[tuple[str, str]],
        functions: Mapping[str, tuple[str, int]],
        request: PlacementRequest,
        exclude_nodes: Collection[str] = (),
        protected: Collection[str] = (),
    ) -> Placement | NoCapacity: ...


class PolicyScheduler:
    def __init__(self, policy: str, migration: MigrationModels | None = None) -> None:
        self.policy = policy
        # Resume-time fits learned from live migrations (gateway.migration feeds them).
        self.migration = migration or MigrationModels()
        # Rebuilds only the nodes whose heartbeat, bookings or protected instances changed:
        # 3-9 ms a decision at 1,000 nodes against 74-154 ms for a full build (bench/RESULTS.md).
        self._snapshots = SnapshotCache()

    def place(
        self,
        heartbeats: Sequence[NodeHeartbeat],
        reserved: Collection[tuple[str, str]],
        functions: Mapping[str, tuple[str, int]],
        request: PlacementRequest,
        exclude_nodes: Collection[str] = (),
        protected: Collection[str] = (),
    ) -> Placement | NoCapacity:
        """``protected``: instance ids that must not be evicted although the node reports them
        idle (the gateway has requests in flight on them, or their function is at its min)."""
        by_node = {hb.node_id: hb for hb in heartbeats if hb.node_id not in exclude_nodes}
        booked: dict[str, list[str]] = {}
        for node, device in reserved:
            booked.setdefault(node, []).append(device)
        snapshot = self._snapshots.snapshot(
            by_node,
            booked,
            functions=functions,
            migration=self.migration.fits(),
            reclaim_idle=True,
            protected=protected,
        )
        return place(snapshot, request, _APPLIED.get(self.policy, self.policy))
