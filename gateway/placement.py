"""The Scheduler port (STYLE.md 4) and its adapter onto ``gateway.scheduler`` (pure policies).

The controller asks for a placement with the live heartbeats, the devices its own pending loads
have booked, and the registry's checkpoint sizes; the adapter builds the snapshot, applies the
configured policy. Bandwidths come from the heartbeats (each node learns its own from the
loads it runs; the gateway's ready events time command-to-ready, not the transfer alone).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from gateway.scheduler.policies import place
from gateway.scheduler.snapshot import snapshot_from_heartbeats
from gateway.scheduler.types import NoCapacity, Placement, PlacementRequest
from sllm.messages import NodeHeartbeat

# Policies the gateway can apply today. locality+migration's migrate decisions need the
# migration protocol wired into the gateway (issue 7): until then it places as `locality`.
_APPLIED = {"locality+migration": "locality"}


class Scheduler(Protocol):
    policy: str

    def place(
        self,
        heartbeats: Sequence[NodeHeartbeat],
        reserved: Collection[tuple[str, str]],
        functions: Mapping[str, tuple[str, int]],
        request: PlacementRequest,
        exclude_nodes: Collection[str] = (),
    ) -> Placement | NoCapacity: ...


class PolicyScheduler:
    def __init__(self, policy: str) -> None:
        self.policy = policy

    def place(
        self,
        heartbeats: Sequence[NodeHeartbeat],
        reserved: Collection[tuple[str, str]],
        functions: Mapping[str, tuple[str, int]],
        request: PlacementRequest,
        exclude_nodes: Collection[str] = (),
    ) -> Placement | NoCapacity:
        by_node = {hb.node_id: hb for hb in heartbeats if hb.node_id not in exclude_nodes}
        booked: dict[str, list[str]] = {}
        for node, device in reserved:
            booked.setdefault(node, []).append(device)
        snapshot = snapshot_from_heartbeats(
            by_node,
            booked,
            functions=functions,
            reclaim_idle=True,
        )
        return place(snapshot, request, _APPLIED.get(self.policy, self.policy))
