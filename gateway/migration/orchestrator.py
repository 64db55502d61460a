"""Gateway-side orchestration of a live migration: instance ``I`` of function ``A`` moves from
its node ``S`` to node ``D``.

1. Target: a ready instance of ``A`` (same revision) on ``D``, or a new one loaded there (from
   ``D``'s best tier) while ``I`` keeps serving. ``A``'s scaling is frozen meanwhile
   (``Migrator.moving``): a loading target and a draining source are not a change of demand.
2. ``I`` is marked draining (new requests go to the target), then ``migrate`` goes to ``S``:
   the node runs the rounds and the switch (runtime.migration); client streams follow the
   switch in the proxy (``follow_moves``).
3. Success: ``I`` is unloaded (its JSON answers finish first), the resume is observed by the
   cost model (seconds against tokens), which is saved in the KV bucket (``fits``). Failure before the switch: ``I`` serves again, nothing
   was lost, and a target this migration loaded is unloaded.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.commands import COMMAND_TIMEOUT_S, NodeCommands
from gateway.dispatcher import Dispatcher
from gateway.instances import Instance, InstanceTable
from gateway.migration.fits import MigrationFitStore
from gateway.registry import Registry
from gateway.scheduler.estimators import MigrationModels
from gateway.scheduler.types import Migration
from sllm.bus import Bus
from sllm.clock import Clock
from sllm.errors import Conflict, InvalidInput, NotFound, SllmError
from sllm.messages import LoadCmd, MigrateCmd, UnloadCmd

log = logging.getLogger(__name__)


class MigrationFailed(SllmError):
    code = "migration_failed"
    status = 502


@dataclass(frozen=True)
class MigrationSettings:
    """``load_timeout_s``: the target's load; ``migrate_timeout_s``: the rounds and switch
    (the node answers when the switch is done); ``drain_s``: the source's drain afterwards."""

    load_timeout_s: float = 180.0
    migrate_timeout_s: float = 120.0
    drain_s: float = 60.0
    max_rounds: int = 3
    threshold_tokens: int = 8
    poll_s: float = 0.05


class Migrator:
    def __init__(
        self,
        table: InstanceTable,
        registry: Registry,
        dispatcher: Dispatcher,
        bus: Bus,
        clock: Clock,
        models: MigrationModels | None = None,
        settings: MigrationSettings | None = None,
        fits: MigrationFitStore | None = None,
    ) -> None:
        self._table = table
        self._registry = registry
        self._dispatcher = dispatcher
        self._commands = NodeCommands(bus, COMMAND_TIMEOUT_S)
        self._clock = clock
        self.models = models or MigrationModels()
        self.fits = fits  # where observed fits are saved (None: memory only)
        self.settings = settings or MigrationSettings()
        self.active: set[str] = set()  # instance ids being migrated
        self._moving: set[str] = set()  # functions with an instance migrating

    def moving(self, function: str) -> bool:
        """Whether an instance of ``function`` is migrating: its scaling waits meanwhile."""
        return function in self._moving

    async def migrate(self, instance_id: str, target_node: str) -> dict[str, Any]:
        """Move ``instance_id``'s in-flight streams to ``target_node``; the outcome as data."""
        source = self._table.instances.get(instance_id)
        if source is None:
            raise NotFound(f"instance {instance_id!r} is not known to the gateway")
        if source.state != "ready" or not source.address:
            raise Conflict(f"instance {instance_id} is {source.state}; only a ready one migrates")
        if target_node == source.node:
            raise InvalidInput(f"target_node: instance {instance_id} already runs on {target_node}")
        live = {hb.node_id for hb in self._table.live_nodes(self._clock.now())}
        if target_node not in live:
            raise NotFound(f"target_node: node {target_node!r} is not connected")
        record = self._registry.get(source.function)
        if instance_id in self.active:
            raise Conflict(f"instance {instance_id} is already migrating")
        self.active.add(instance_id)
        self._moving.add(source.function)
        started = self._clock.now()
        launched: Instance | None = None
        try:
            target, loaded = await self._target(record.to_dict(), source, target_node)
            launched = target if loaded else None
            source.state = "draining"  # new requests go to the target from now on
            migration_id = uuid.uuid4().hex[:12]
            log.info(
                "migration %s start function=%s instance=%s from=%s to=%s target=%s",
                migration_id, source.function, instance_id, source.node, target_node,
                target.instance_id,
            )  # fmt: skip
            assert target.address is not None
            command = MigrateCmd(
                instance_id, migration_id, target_node, target.instance_id, target.address,
                self.settings.max_rounds, self.settings.threshold_tokens, target.secret,
            )  # fmt: skip
            reply = await self._commands.send(source.node, command, self.settings.migrate_timeout_s)
        except SllmError as exc:
            self._restore(source)
            if launched is not None:
                await self._unload(launched)
            log.warning("migration of %s failed: %s", instance_id, exc.message)
            raise MigrationFailed(
                f"migration of {instance_id} failed, it keeps serving: {exc.message}"
            ) from None
        finally:
            self.active.discard(instance_id)
            self._moving.discard(source.function)
        outcome = dict(reply.data)
        if int(outcome.get("moved", 0)) > 0:
            self.models.observe(
                record.checkpoint, int(outcome.get("tokens", 0)), float(outcome.get("seconds", 0))
            )
            if self.fits is not None:
                await self.fits.save(record.checkpoint)
        await self._unload(source)
        total = self._clock.now() - started
        log.info("migration %s done total_s=%.3f %s", migration_id, total, outcome)
        return {
            "migration_id": migration_id,
            "function": source.function,
            "source": {"instance": instance_id, "node": source.node},
            "target": {"instance": target.instance_id, "node": target_node, "loaded": loaded},
            "total_s": round(total, 6),
            **outcome,
        }

    async def free_devices(self, migration: Migration) -> None:
        """Apply a placement's ``Migration``: move the victim's streams to its target node,
        then wait until the victim has stopped, so its devices are free for the new instance.
        MigrationFailed (the victim keeps serving) otherwise.

        A victim that has finished its requests since the decision has nothing to move: it is
        stopped like an evicted instance (no target is loaded for it); one already gone has
        freed its devices."""
        victim = self._table.instances.get(migration.victim)
        if victim is None:
            return
        if self._idle(victim):
            log.info("migration victim %s is idle: stopped, not moved", victim.instance_id)
            await self._unload(victim)
        else:
            await self.migrate(migration.victim, migration.target_node)
        deadline = self._clock.now() + self.settings.drain_s + 15.0
        while migration.victim in self._table.instances:
            if self._clock.now() > deadline:
                raise MigrationFailed(f"instance {migration.victim} did not stop after migrating")
            await self._clock.sleep(self.settings.poll_s)

    def _idle(self, inst: Instance) -> bool:
        """Ready, with no request in flight through this gateway and, in its node's latest
        heartbeat, none in its engine (streams moved onto it count only there)."""
        if inst.state != "ready" or inst.in_flight > 0:
            return False
        info = self._table.nodes.get(inst.node)
        if info is None:
            return False
        states = [i for i in info.heartbeat.instances if i.instance_id == inst.instance_id]
        return bool(states) and states[0].in_flight == 0

    def _restore(self, source: Instance) -> None:
        """The source keeps serving (it was never interrupted before the switch)."""
        if self._table.instances.get(source.instance_id) is source and source.state == "draining":
            source.state = "ready"
            self._dispatcher.release_waiters(source.function, source.revision)

    async def _target(
        self, record: dict[str, Any], source: Instance, node: str
    ) -> tuple[Instance, bool]:
        """(ready instance of the source's function and revision on ``node``, loaded now)."""
        for inst in self._table.of(source.function):
            if (
                inst.node == node
                and inst.revision == source.revision
                and inst.state == "ready"
                and inst.address
            ):
                return inst, False
        device = self._free_device(node)
        instance_id = f"{source.function}-{uuid.uuid4().hex[:10]}"
        now = self._clock.now()
        self._table.launched(instance_id, source.function, node, device, source.revision, now)
        try:
            await self._commands.send(node, LoadCmd(instance_id, source.function, record, device))
        except SllmError:
            self._table.forget(instance_id)
            raise
        deadline = now + self.settings.load_timeout_s
        while True:
            loaded = self._table.instances.get(instance_id)
            if loaded is None:
                raise MigrationFailed(f"target instance {instance_id} on {node} failed to load")
            if loaded.state == "ready" and loaded.address:
                return loaded, True
            if self._clock.now() > deadline:
                raise MigrationFailed(
                    f"target instance {instance_id} on {node} was not ready in time"
                )
            await self._clock.sleep(self.settings.poll_s)

    def _free_device(self, node: str) -> str:
        info = self._table.nodes.get(node)
        booked = {d for n, d in self._table.booked_devices() if n == node}
        devices = info.heartbeat.devices if info is not None else []
        for device in devices:
            if device.instance_id is None and device.device not in booked:
                return device.device
        raise Conflict(f"target_node: node {node} has no free device for the target instance")

    async def _unload(self, inst: Instance) -> None:
        if self._table.instances.get(inst.instance_id) is not inst:
            return  # already gone
        inst.state = "draining"
        try:
            await self._commands.send(inst.node, UnloadCmd(inst.instance_id, self.settings.drain_s))
        except SllmError as exc:
            log.warning("unload after migration failed instance=%s: %s", inst.instance_id, exc)
