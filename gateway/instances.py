"""The gateway's view of nodes and instances, built from heartbeats, instance events and its own
load/unload commands. Plain bookkeeping: no I/O, no clock reads (``now`` is passed in).

Instance states the gateway uses: ``starting`` (load sent, not ready yet), ``ready`` (routable),
``draining`` (unload sent or the node says so: no new requests), ``unreachable`` (a proxied
request could not connect: not routed until a heartbeat or event says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sllm.messages import InstanceEvent, InstanceState, NodeHeartbeat

# A node whose last heartbeat is older than this is *silent* (a node beats every 2 s by
# default: 5 missed beats): no longer offered to placements, and its instances are asked
# directly (their /healthz) whether they still serve. Silence alone is no proof of death: NATS
# may be down while the node and its instances run (issue 14). SLLM_NODE_TIMEOUT sets it.
NODE_STALE_S = 10.0
# An instance the gateway launched may be missing from heartbeats sent before the load command
# arrived; only after this long is its absence taken as "it is gone".
LAUNCH_GRACE_S = 10.0

# Failed loads worth trying again (elsewhere, or later): the node's DRAM tier had no room
# beside the instances running there, or it had no free device or was draining.
TRANSIENT_LOAD_FAILURES = frozenset({"cache_full", "unavailable"})

# A heartbeat's instance states (sllm.messages.InstanceStatus) as the gateway's; stopped and
# failed ones are left to the event path.
_NODE_STATE = {
    "starting": "starting",
    "loading": "starting",
    "ready": "ready",
    "draining": "draining",
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
    backend: str = ""
    backend_reason: str = ""

    def summary(self) -> dict[str, object]:
        return {
            "id": self.instance_id,
            "node": self.node,
            "device": self.device,
            "state": self.state,
            "address": self.address,
            "in_flight": self.in_flight,
            "revision": self.revision,
            "backend": self.backend,
            "backend_reason": self.backend_reason,
        }


@dataclass
class NodeInfo:
    """``reachable`` False: a command found nobody listening on the node's subject (its
    process is gone); no placement goes there until it beats again."""

    heartbeat: NodeHeartbeat
    seen: float
    reachable: bool = True


@dataclass
class ReadyChange:
    """What an event or heartbeat changed, for the caller to act on (release queued requests,
    count a cold start, fail waiters). ``adopted``: instances the gateway did not launch (it
    restarted, or another gateway launched them). ``failed``: (instance, error, definitive):
    definitive when trying again would fail the same way (a broken checkpoint), not when the
    node or its room went away."""

    became_ready: list[Instance] = field(default_factory=list)
    adopted: list[Instance] = field(default_factory=list)
    failed: list[tuple[Instance, str, bool]] = field(default_factory=list)
    removed: list[Instance] = field(default_factory=list)


class InstanceTable:
    def __init__(self, node_timeout_s: float = NODE_STALE_S) -> None:
        self.node_timeout_s = node_timeout_s
        self.instances: dict[str, Instance] = {}
        self.nodes: dict[str, NodeInfo] = {}

    # --- queries -------------------------------------------------------------------------
    def of(self, function: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.function == function]

    def serving(self, function: str, revision: int | None = None) -> list[Instance]:
        """Its instances that serve or start (of ``revision`` only, when given)."""
        return [
            i
            for i in self.of(function)
            if i.state in ("ready", "starting") and revision in (None, i.revision)
        ]

    def routable(self, function: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.function == function and i.state == "ready"]

    def live_nodes(self, now: float) -> list[NodeHeartbeat]:
        """Nodes placements may use: beating, and answering commands."""
        return [
            n.heartbeat
            for n in self.nodes.values()
            if now - n.seen <= self.node_timeout_s and n.reachable
        ]

    def silent_nodes(self, now: float) -> list[str]:
        """Nodes whose heartbeats stopped ``node_timeout_s`` ago (dead, or cut off from NATS)."""
        return [n for n, info in self.nodes.items() if now - info.seen > self.node_timeout_s]

    def mark_unreachable(self, node_id: str) -> None:
        info = self.nodes.get(node_id)
        if info is not None:
            info.reachable = False

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
            inst.backend, inst.backend_reason = event.backend, event.backend_reason
            if inst.state in ("starting", "unreachable"):
                inst.state = "ready"
                inst.since = now
                change.became_ready.append(inst)
        elif event.kind in ("failed", "stopped") and inst is not None:
            del self.instances[event.instance_id]
            if event.kind == "failed":
                definitive = event.code not in TRANSIENT_LOAD_FAILURES
                change.failed.append((inst, event.error or "instance failed", definitive))
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
        before = self.nodes.get(hb.node_id)
        restarted = before is not None and hb.seq < before.heartbeat.seq
        self.nodes[hb.node_id] = NodeInfo(hb, now)
        reported = {s.instance_id: s for s in hb.instances}
        for state in hb.instances:
            self._apply_reported(hb.node_id, state, now, change)
        for inst in [i for i in self.instances.values() if i.node == hb.node_id]:
            if inst.instance_id in reported:
                continue
            # A restarted node does not know the instances of the process before it: those
            # drain on their own, so none is routed to from its first beat on. Only a load
            # still starting may be one the new process has not reported yet.
            orphan = restarted and inst.state != "starting"
            if orphan or now - inst.since > LAUNCH_GRACE_S:
                del self.instances[inst.instance_id]
                change.removed.append(inst)
        return change

    def on_probe(
        self, node_id: str, answered: dict[str, bool], now: float, reason: str
    ) -> ReadyChange:
        """Apply what a silent node's instances answered to their health checks
        (``answered``: instance id -> True when it serves). Instances that do not serve are
        dropped; if none serves (or it has none), the node is taken for dead and dropped with
        every instance it had, starting ones too. Answering instances stay routable, also
        those a failed request had marked unreachable (no heartbeat will restore them)."""
        change = ReadyChange()
        info = self.nodes.get(node_id)
        if info is None or now - info.seen <= self.node_timeout_s:
            return change  # it beat again meanwhile: the heartbeat is the better news
        alive = any(answered.values())
        for inst in [i for i in self.instances.values() if i.node == node_id]:
            ok = answered.get(inst.instance_id)
            if ok:
                if inst.state == "unreachable":
                    inst.state = "ready"
                    inst.since = now
                    change.became_ready.append(inst)
                continue
            if ok is None and alive:
                continue  # starting (no address yet) on a node that is alive
            del self.instances[inst.instance_id]
            change.failed.append((inst, reason, False))
        if not alive:
            del self.nodes[node_id]
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
        if state.backend:
            inst.backend, inst.backend_reason = state.backend, state.backend_reason
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
