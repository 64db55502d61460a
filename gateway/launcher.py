"""Applying a placement for a new instance (the controller's "apply" side for loads): ask the
Scheduler, book the instance as starting (the next decision already counts it), then send its
``LoadCmd`` in a task, once an evicted instance has stopped or a live migration
(gateway.migration) has moved the placement's victim away; a refused or failed load is placed
on another node, up to ``LOAD_ATTEMPTS`` nodes.

What happens then depends on why it failed (``lost(function, reason, transient)``): when the
node is gone, silent, out of room or NATS is down, trying again later can succeed, so the
function's waiters keep waiting (up to the wake deadline) and the controller places again on
a later tick, when the node is back or another has room; a node found not running is not
offered again until it beats. Only a definitive refusal (a malformed record) fails them now.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.commands import CommandFailed, NodeCommands
from gateway.instances import Instance, InstanceTable
from gateway.metrics import GatewayMetrics
from gateway.migration.orchestrator import Migrator
from gateway.placement import Scheduler, protected_instances
from gateway.registry import Registry
from gateway.role import Alone, Role
from gateway.scheduler.types import NoCapacity, Placement, PlacementRequest
from sllm.clock import Clock
from sllm.errors import SllmError, Unavailable
from sllm.messages import LoadCmd, StartRecord
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 3
# An idle instance evicted for a placement drains nothing; 30 s bounds a node that never
# reports it stopped (the load is then sent anyway and the node answers for itself).
EVICT_WAIT_S = 30.0


class Launcher:
    """``evict`` stops an instance a placement displaces; ``lost(function, reason, transient)``
    is called when an instance cannot be placed anywhere; ``spawn`` runs the load tasks."""

    def __init__(
        self,
        registry: Registry,
        table: InstanceTable,
        commands: NodeCommands,
        scheduler: Scheduler,
        clock: Clock,
        metrics: GatewayMetrics,
        *,
        evict: Callable[[Instance], None],
        lost: Callable[[str, str, bool], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        role: Role | None = None,
        migrator: Migrator | None = None,
    ) -> None:
        self._registry = registry
        self._table = table
        self._commands = commands
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._evict = evict
        self._lost = lost
        self._spawn = spawn
        self._role: Role = role or Alone()
        self.migrator = migrator  # applies placements that migrate an instance away
        # Instances booked as starting whose load command has not gone out yet (it waits for a
        # migration or an eviction to free the device): a heartbeat that does not show them
        # is no sign they are gone (InstanceTable drops a launch unseen for LAUNCH_GRACE_S).
        self.unsent: set[str] = set()
        # instance id -> when its placement expected it ready (Retry-After while it starts)
        self.expected_ready: dict[str, float] = {}

    def launch(
        self, record: FunctionRecord, exclude: frozenset[str] = frozenset(), why: str = ""
    ) -> bool:
        """Place one instance and book it as starting; the load command goes out in a task."""
        now = self._clock.now()
        spec = record.spec
        request = PlacementRequest(
            function=spec.name,
            checkpoint=record.checkpoint,
            checkpoint_bytes=record.checkpoint_bytes,
            accelerators=max(1, spec.resources.accelerators),
        )
        nodes = self._table.live_nodes(now)
        functions = {r.spec.name: (r.checkpoint, r.checkpoint_bytes) for r in self._registry.all()}
        placement = self._scheduler.place(
            nodes,
            self._table.booked_devices(),
            functions,
            request,
            exclude,
            protected_instances(self._table, self._registry.all(), spec.name),
        )
        if isinstance(placement, NoCapacity):
            self._metrics.placements.labels(self._scheduler.policy, "no_capacity", "").inc()
            log.warning("no capacity function=%s reason=%s", spec.name, placement.reason)
            if not why and not nodes:  # (a retry elsewhere is reported by _place_elsewhere)
                self._lost(spec.name, "no node is connected", True)
            return False
        self._metrics.placements.labels(self._scheduler.policy, "placed", placement.tier).inc()
        moved = placement.migration
        log.info(
            "place function=%s node=%s devices=%s tier=%s estimated_s=%.3f policy=%s%s",
            spec.name, placement.node, ",".join(placement.devices), placement.tier,
            placement.estimated_s, placement.policy,
            f" migrate={moved.victim} to={moved.target_node}" if moved is not None else "",
        )  # fmt: skip
        evicted = []
        for victim_id in placement.evict:
            victim = self._table.instances.get(victim_id)
            if victim is not None:
                self._evict(victim)
                evicted.append(victim_id)
        instance_id = f"{spec.name}-{uuid.uuid4().hex[:10]}"
        device = placement.devices[0]
        self._table.launched(instance_id, spec.name, placement.node, device, record.revision, now)
        for gone in [i for i in self.expected_ready if i not in self._table.instances]:
            del self.expected_ready[gone]
        self.expected_ready[instance_id] = now + placement.estimated_s
        command = LoadCmd(instance_id, spec.name, record.to_dict(), device)
        self.unsent.add(instance_id)
        if placement.migration is not None:  # a running instance moves away first (issue 7)
            self._spawn(self._migrate_then_load(record, placement, command, exclude))
            return True
        self._spawn(self._send_load(record, placement.node, command, exclude, evicted))
        return True

    async def _migrate_then_load(
        self,
        record: FunctionRecord,
        placement: Placement,
        command: LoadCmd,
        exclude: frozenset[str],
    ) -> None:
        """Live-migrate the placement's victim to its target node (gateway.migration), then
        load on the devices it freed; a failed migration places the instance elsewhere."""
        assert placement.migration is not None
        try:
            if self.migrator is None:
                raise Unavailable("live migration is not wired into this gateway")
            await self.migrator.free_devices(placement.migration)
        except SllmError as exc:
            log.warning("migration for a placement failed function=%s error=%s",
                        command.function, exc.message)  # fmt: skip
            self.unsent.discard(command.instance_id)
            self._place_elsewhere(
                record, command.instance_id, exclude | {placement.node}, exc.message, True
            )
            return
        await self._send_load(record, placement.node, command, exclude, [])

    def _place_elsewhere(
        self,
        record: FunctionRecord,
        instance_id: str,
        tried: frozenset[str],
        reason: str,
        transient: bool,
    ) -> None:
        """A booked instance could not be loaded on its node: forget it and place it on a node
        not ``tried`` yet, up to ``LOAD_ATTEMPTS`` nodes; past that it is lost (its waiters
        fail only when the failure is not ``transient``)."""
        self._table.forget(instance_id)
        self._role.gone(instance_id)
        if len(tried) < LOAD_ATTEMPTS and self.launch(record, tried, reason):
            return
        self._lost(record.spec.name, f"{reason}; no other node can take it", transient)

    async def _send_load(
        self,
        record: FunctionRecord,
        node: str,
        command: LoadCmd,
        exclude: frozenset[str],
        evicted: list[str],
    ) -> None:
        # The node frees an evicted instance's device only once it stopped: load after that.
        deadline = self._clock.now() + EVICT_WAIT_S
        while any(v in self._table.instances for v in evicted) and self._clock.now() < deadline:
            await self._clock.sleep(0.05)
        self.unsent.discard(command.instance_id)
        booked = self._table.instances.get(command.instance_id)
        if booked is None or booked.state != "starting":
            # Its node went away, or it was drained (function deleted) while it waited.
            self._table.forget(command.instance_id)
            return
        start = StartRecord(
            command.instance_id, command.function, node, command.device, record.revision, 0
        )
        if not await self._role.booked(start):  # this gateway stopped deciding meanwhile
            self._table.forget(command.instance_id)
            return
        booked.since = self._clock.now()
        try:
            await self._commands.send(node, command)
        except CommandFailed as exc:
            log.warning("load failed function=%s node=%s error=%s", command.function, node, exc)
            if exc.node_gone:
                self._table.mark_unreachable(node)
            self._place_elsewhere(
                record, command.instance_id, exclude | {node}, str(exc), exc.transient
            )
