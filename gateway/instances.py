"""The gateway's view of nodes and instances, built from heartbeats, instance events and its own
load/unload commands. Plain bookkeeping: no I/O, no clock reads (``now`` is passed in).

Instance states the gateway uses: ``starting`` (load sent, not ready yet), ``ready`` (routable),
``draining`` (unload sent or the node says so: no new requests), ``unreachable`` (a proxied
request could not connect: not routed until a heartbeat or event says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sllm.messages import InstanceEvent, InstanceState, NodeHeartbeat

# A node whose last heartbeat is older than this is gone, with its instances (a node beats
# every 2 s by default: 5 missed beats).
NODE_STALE_S = 10.0
# An instance the gateway launched may be missing from heartbeats sent before the load command
# arrived; only after this long is its absence taken as "it is gone".
LAUNCH_GRACE_S = 10.0

_NODE_STATE = {
    "starting": "starting",
    "loading": "starting",
    "pending": "starting",
    "warming": "starting",
    "ready": "ready",
    "serving": "ready",
    "draining": "draining",
    "stopping": "draining",
    "migrating": "draining",
}


@dataclass
class Instance:
    instance_id: str
    function: str
    node: str
    device: str
    revision: int
    state: str
    since: float
    address: str | None = None
    in_flight: int = 0
    tier: str = ""
    # sent on every call to the instance (sllm.instance_auth); never shown by summary()
    secret: str = field(default="", repr=False)

    def summary(self) -> dict[str, object]:
        return {
            "id": self.instance_id,
            "node": self.node,
            "device": self.device,
            "state": self.state,
            "address": self.address,
            "in_flight": self.in_flight,
            "revision": self.revision,
        }


@dataclass
class NodeInfo:
    heartbeat: NodeHeartbeat
    seen: float


@dataclass
class ReadyChange:
    """What an event or heartbeat changed, for the caller to act on (release queued requests,
    count a cold start, fail waiters). ``adopted``: instances the gateway did not launch (it
    restarted, or another gateway launched them)."""

    became_ready: list[Instance] = field(default_factory=list)
    adopted: list[Instance] = field(default_factory=list)
    failed: list[tuple[Instance, str]] = field(default_factory=list)
    removed: list[Instance] = field(default_factory=list)


class InstanceTable:
    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.nodes: dict[str, NodeInfo] = {}

    # --- queries -------------------------------------------------------------------------
    def of(self, function: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.function == function]

    def routable(self, function: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.function == function and i.state == "ready"]

    def live_nodes(self, now: float) -> list[NodeHeartbeat]:
        return [n.heartbeat for n in self.nodes.values() if now - n.seen <= NODE_STALE_S]

    def booked_devices(self) -> set[tuple[str, str]]:
        """(node, device) pairs held by instances the latest heartbeats do not show yet: loads
        just sent, or instances that came up since their node last beat. (Instances a heartbeat
        shows on their device are left out: the snapshot sees them, and may evict them.)"""
        booked = set()
        for inst in self.instances.values():
            if not inst.device:
                continue
            info = self.nodes.get(inst.node)
            shown = info is not None and any(
                d.device == inst.device and d.instance_id == inst.instance_id
                for d in info.heartbeat.devices
            )
            if inst.state == "starting" or not shown:
                booked.add((inst.node, inst.device))
        return booked

    # --- changes from the gateway itself -------------------------------------------------
    def launched(
        self, instance_id: str, function: str, node: str, device: str, revision: int, now: float
    ) -> Instance:
        inst = Instance(instance_id, function, node, device, revision, "starting", now)
        self.instances[instance_id] = inst
        return inst

    def set_state(self, instance_id: str, state: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.state = state

    def forget(self, instance_id: str) -> Instance | None:
        return self.instances.pop(instance_id, None)

    # --- changes reported by nodes ---------------------------------------------------------
    def on_event(self, event: InstanceEvent, now: float) -> ReadyChange:
        change = ReadyChange()
        inst = self.instances.get(event.instance_id)
        if event.kind == "ready":
            if inst is None:
                inst = Instance(
                    event.instance_id,
                    event.function,
                    event.node_id,
                    "",
                    event.revision,
                    "starting",
                    now,
                )
                self.instances[event.instance_id] = inst
                change.adopted.append(inst)
            inst.address = event.address
            inst.secret = event.secret or inst.secret
            inst.tier = event.tier
            if inst.state in ("starting", "unreachable"):
                inst.state = "ready"
                inst.since = now
                change.became_ready.append(inst)
        elif event.kind in ("failed", "stopped") and inst is not None:
            del self.instances[event.instance_id]
            if event.kind == "failed":
                change.failed.append((inst, event.error or "instance failed"))
            else:
                change.removed.append(inst)
        return change

    def secret_at(self, address: str) -> str:
        """The secret of the instance at ``address`` ("" when none is known there)."""
        for inst in self.instances.values():
            if inst.address == address:
                return inst.secret
        return ""

    def on_heartbeat(self, hb: NodeHeartbeat, now: float) -> ReadyChange:
        change = ReadyChange()
        # Every beat is taken as the latest (one publisher per node; NATS keeps its order), so
        # a restarted node whose seq starts again from 1 is heard at once.
        self.nodes[hb.node_id] = NodeInfo(hb, now)
        reported = {s.instance_id: s for s in hb.instances}
        for state in hb.instances:
            self._apply_reported(hb.node_id, state, now, change)
        for inst in [i for i in self.instances.values() if i.node == hb.node_id]:
            if inst.instance_id not in reported and now - inst.since > LAUNCH_GRACE_S:
                del self.instances[inst.instance_id]
                change.removed.append(inst)
        return change

    def expire(self, now: float) -> ReadyChange:
        """Drop nodes that stopped beating, with their instances."""
        change = ReadyChange()
        for node_id in [n for n, info in self.nodes.items() if now - info.seen > NODE_STALE_S]:
            del self.nodes[node_id]
            for inst in [i for i in self.instances.values() if i.node == node_id]:
                del self.instances[inst.instance_id]
                change.failed.append((inst, f"node {node_id} stopped sending heartbeats"))
        return change

    def _apply_reported(
        self, node_id: str, state: InstanceState, now: float, change: ReadyChange
    ) -> None:
        mapped = _NODE_STATE.get(state.state)
        inst = self.instances.get(state.instance_id)
        if mapped is None:  # failed, stopped or unknown: the event path handles the news
            return
        if inst is None:
            inst = Instance(
                state.instance_id,
                state.function,
                node_id,
                state.device,
                state.revision,
                "starting",
                now,
                address=state.address,
            )
            self.instances[state.instance_id] = inst
            change.adopted.append(inst)
        inst.device = state.device or inst.device
        if state.address:
            inst.address = state.address
        if state.secret:
            inst.secret = state.secret
        if inst.state == "draining":
            return  # the gateway asked it to drain; the node's catching up
        if mapped == "ready" and inst.address and inst.state != "ready":
            inst.state = "ready"
            inst.since = now
            change.became_ready.append(inst)
        elif mapped != "ready":
            inst.state = mapped
