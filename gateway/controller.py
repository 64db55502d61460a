"""The control loop (STYLE.md 2): gather, decide, apply.

- gather: the instance table (heartbeats, events, the gateway's own commands), the cold-start
  queue and the in-flight counts;
- decide: ``autoscaler.decide`` per function and ``Scheduler.place`` per new instance;
- apply: ``UnloadCmd`` to nodes here; new instances through ``gateway.launcher`` (placement,
  eviction or migration first, ``LoadCmd``, another node for a refused or unanswered load).

The loop runs every ``tick_s`` and at once when a request starts waiting (``poke``). Loads are
applied in background tasks; an instance is booked as ``starting`` before its command is sent,
so the next decision already counts it (one wake per burst).

Among several gateways (``gateway.role``, ``gateway.peers``) only the one that decides runs the
"decide" and "apply" steps, counting the requests the others have in flight and queued; the
others keep their instance table and queues current and release their waiters. What it decides
is kept for the next one (``resume``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from gateway.autoscaler import Observation, ScalerState, decide
from gateway.commands import CommandFailed, NodeCommands
from gateway.dispatcher import Dispatcher
from gateway.gauges import update_gauges
from gateway.instances import Instance, InstanceTable, ReadyChange
from gateway.launcher import Launcher
from gateway.metrics import GatewayMetrics
from gateway.migration.orchestrator import Migrator
from gateway.placement import Scheduler
from gateway.registry import Registry
from gateway.role import Alone, Role
from gateway.scale_state import Resumed
from gateway.silent_nodes import Probe, SilentNodes, never_answers
from sllm.clock import Clock
from sllm.errors import Unavailable
from sllm.messages import InstanceEvent, NodeHeartbeat, UnloadCmd
from sllm.spec import FunctionRecord
from sllm.tasks import cancel_all

log = logging.getLogger(__name__)

# After a failed start, the next one waits 0.25 s, doubling up to 4 s while starts keep
# failing (each retry of a node that refuses costs it and the gateway a round trip).
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 4.0


class Controller:
    def __init__(
        self,
        registry: Registry,
        table: InstanceTable,
        dispatcher: Dispatcher,
        commands: NodeCommands,
        scheduler: Scheduler,
        clock: Clock,
        metrics: GatewayMetrics,
        *,
        stable_window_s: float,
        drain_s: float,
        tick_s: float = 0.5,
        settle_s: float = 0.0,
        probe: Probe | None = None,
        role: Role | None = None,
        migrator: Migrator | None = None,
    ) -> None:
        self._registry = registry
        self._table = table
        self._dispatcher = dispatcher
        self._commands = commands
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._stable_window_s = stable_window_s
        self._drain_s = drain_s
        self._tick_s = tick_s
        self._settle_until = clock.now() + settle_s
        self._role: Role = role or Alone()
        self._start_failures: dict[str, int] = {}  # failed starts in a row, per function
        self._retry_at: dict[str, float] = {}  # no new start of the function before this
        self._scalers: dict[str, ScalerState] = {}
        self._manual: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.launcher = Launcher(
            registry, table, commands, scheduler, clock, metrics,
            evict=self._evict,
            lost=lambda function, reason, transient: self._lost(
                function, reason, wake_failed=not transient, start_failed=True
            ),
            spawn=self._spawn,
            role=self._role,
            migrator=migrator,
        )  # fmt: skip
        self.silent = SilentNodes(table, clock, probe or never_answers, self._spawn, self._after)

    @property
    def migrator(self) -> Migrator | None:
        """Applies the placements that migrate a running instance (None: no live migration)."""
        return self.launcher.migrator

    # --- inputs ---------------------------------------------------------------------------
    def poke(self, function: str = "") -> None:
        """Reconcile now (a request started waiting, a function changed)."""
        self._wake.set()

    def scale(self, function: str, replicas: int) -> None:
        self._manual[function] = replicas
        self.poke(function)

    def resume(self, resumed: Resumed) -> None:
        """This gateway now decides: go on from what the last one left. Its unconfirmed loads
        are booked as starting (the launch grace drops those no heartbeat ever shows), and each
        function's count is the one it decided; timers start from now."""
        now = self._clock.now()
        for s in [s for s in resumed.starting if s.instance_id not in self._table.instances]:
            self._table.launched(s.instance_id, s.function, s.node, s.device, s.revision, now)
        self._scalers = {
            name: ScalerState(desired=desired, last_active=now)
            for name, desired in resumed.desired.items()
        }
        self.poke()

    def follow(self) -> None:
        """This gateway no longer decides: what it had decided is the next leader's to resume."""
        self._scalers.clear()
        self._manual.clear()

    def on_event(self, event: InstanceEvent) -> None:
        change = self._table.on_event(event, self._clock.now())
        for inst in change.became_ready:
            tier = event.tier or "unknown"
            log.info(
                "instance ready function=%s instance=%s node=%s tier=%s load_s=%.3f",
                inst.function, inst.instance_id, inst.node, tier, event.load_s,
            )  # fmt: skip
            self._metrics.cold_starts.labels(inst.function, tier).inc()
            if event.load_s > 0:
                self._metrics.cold_start_seconds.labels(inst.function, tier).observe(event.load_s)
            if tier in ("device", "dram", "ssd", "store"):
                self._metrics.cache_hits.labels(tier).inc()
        self._after(change)

    def on_heartbeat(self, hb: NodeHeartbeat) -> None:
        now = self._clock.now()
        for instance_id in self.launcher.unsent:
            inst = self._table.instances.get(instance_id)
            if inst is not None and inst.state == "starting":
                inst.since = now  # the launch grace runs from when the load is sent
        self._after(self._table.on_heartbeat(hb, now))
        for tier, entries in hb.cache.items():
            self._metrics.cache_bytes.labels(hb.node_id, tier).set(sum(e.nbytes for e in entries))

    def _after(self, change: ReadyChange) -> None:
        now = self._clock.now()
        for inst in [*change.became_ready, *(i for i, _, _ in change.failed), *change.removed]:
            self._role.gone(inst.instance_id)
        for inst in change.adopted:
            # Running before this gateway knew it (a restart): what runs is wanted (not one more:
            # the count resumed from the last leader may include it), keep_alive from now.
            record = self._registry.find(inst.function)
            state = self._scalers.get(inst.function)
            if record is not None and state is not None and inst.revision == record.revision:
                running = len(self._table.serving(inst.function, record.revision))
                self._scalers[inst.function] = replace(
                    state, desired=max(state.desired, running), last_active=now
                )
            log.info(
                "instance adopted function=%s instance=%s node=%s state=%s",
                inst.function, inst.instance_id, inst.node, inst.state,
            )  # fmt: skip
        for inst in change.became_ready:
            self._start_failures.pop(inst.function, None)
            self._retry_at.pop(inst.function, None)
            record = self._registry.find(inst.function)
            if record is not None:
                self._dispatcher.release_waiters(inst.function, record.revision)
        for inst, error, definitive in change.failed:
            log.warning(
                "instance failed function=%s instance=%s node=%s error=%s",
                inst.function, inst.instance_id, inst.node, error,
            )  # fmt: skip
            reason = f"instance {inst.instance_id} on {inst.node} failed: {error}"
            starting = inst.state == "starting"
            self._lost(
                inst.function, reason, wake_failed=definitive and starting, start_failed=starting
            )
        for inst in change.removed:
            log.info("instance stopped function=%s instance=%s", inst.function, inst.instance_id)
            # still starting: a load no node reported (sent by a leader that died, or lost by a
            # restarted node); the decision that launched it stands: another replaces it
            lost_load = inst.state == "starting"
            self._lost(
                inst.function, f"instance {inst.instance_id} stopped", wake_failed=False,
                start_failed=lost_load, keep_desired=lost_load,
            )  # fmt: skip

    def _lost(self, function: str, reason: str, *, wake_failed: bool, start_failed: bool = False,
              keep_desired: bool = False) -> None:  # fmt: skip
        """An instance went away (or never came): re-base the scaler on what is left, so the
        next tick places a new one as the load needs (``keep_desired``: the count stays, and
        the next tick places one whatever the load). When a wake failed for good (the node
        reported the load itself failed: a broken checkpoint) and nothing else is starting,
        queued requests get 503 now rather than at the wake deadline; otherwise (a node died,
        NATS is down, no room yet) they keep waiting for the instance a later tick starts."""
        left = self._table.serving(function)
        state = self._scalers.get(function)
        if state is not None and not keep_desired:
            self._scalers[function] = replace(state, desired=len(left))
        if wake_failed and not left and self._dispatcher.queued(function):
            self._dispatcher.fail_waiters(
                function, Unavailable(f"function {function!r}: wake failed: {reason}")
            )
        elif not left:
            self._dispatcher.note_failure(function, reason)
        if start_failed:
            # the next start waits a little, doubling while starts keep failing: a cause that
            # passes (a node restarting, DRAM held a moment longer) is not hammered meanwhile
            failures = self._start_failures.get(function, 0) + 1
            self._start_failures[function] = failures
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            self._retry_at[function] = self._clock.now() + delay
        self.poke(function)

    def expected_start(self, function: str) -> float | None:
        """Seconds until the soonest starting instance of ``function`` should be ready (its
        placement's estimate; at least 1 s once that is overdue), None when none starts."""
        now = self._clock.now()
        ready_at = [
            self.launcher.expected_ready[i.instance_id]
            for i in self._table.of(function)
            if i.state == "starting" and i.instance_id in self.launcher.expected_ready
        ]
        return max(1.0, min(ready_at) - now) if ready_at else None

    # --- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                self.tick()
            except Exception:
                log.exception("control loop tick failed")
            if self._role.deciding():
                self._metrics.tick_seconds.observe(time.perf_counter() - started)
            sleeper = asyncio.ensure_future(self._clock.sleep(self._tick_s))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
            self._wake.clear()

    async def stop(self) -> None:
        await cancel_all(self._tasks)

    def tick(self) -> None:
        now = self._clock.now()
        self.silent.check(now)
        records = {r.spec.name: r for r in self._registry.all()}
        if not self._role.deciding():
            for record in records.values():
                self._release_if_ready(record)
            self._update_gauges(records)
            return
        if now < self._settle_until:
            # Just started: wait one heartbeat round to learn what already runs before loading
            # or draining anything (queued requests wait; they are released when it is known).
            self._update_gauges(records)
            return
        for record in records.values():
            self._reconcile(record, now)
        for inst in list(self._table.instances.values()):
            if inst.function not in records and inst.state != "draining":
                self._drain(inst, "function deleted")
        for name in [n for n in self._scalers if n not in records]:
            del self._scalers[name]
            self._role.forget(name)
            self._metrics.forget_function(name)
        self._update_gauges(records)

    def _reconcile(self, record: FunctionRecord, now: float) -> None:
        name = record.spec.name
        if self.migrator is not None and self.migrator.moving(name):
            # an instance moves between nodes: its replicas are in flux (a draining source,
            # a loading target), so no scale decision meanwhile
            return
        mine = self._table.of(name)
        current = [i for i in mine if i.revision == record.revision]
        ready = [i for i in current if i.state == "ready"]
        starting = [i for i in current if i.state == "starting"]
        self._release_if_ready(record)
        others = self._role.others_load().get(name)
        obs = Observation(
            in_flight=sum(i.in_flight for i in mine) + (others.in_flight if others else 0),
            queued=self._dispatcher.queued(name) + (others.queued if others else 0),
            ready=len(ready),
            starting=len(starting),
        )
        state = self._scalers.get(name) or ScalerState(
            desired=len(ready) + len(starting), last_active=now
        )
        if name in self._manual:
            state = replace(state, manual=self._manual.pop(name))
        decision, state = decide(
            record.spec.scale, obs, state, now, stable_window_s=self._stable_window_s
        )
        previous = self._scalers.get(name)
        if previous is None or previous.desired != state.desired:
            self._role.desired(name, state.desired)
        self._scalers[name] = state
        held = now < self._retry_at.get(name, 0.0)  # its last start failed a moment ago
        if decision.wake and not held:
            self._metrics.wakes.labels(name).inc()
            log.info("wake function=%s queued=%d", name, obs.queued)
        have = len(ready) + len(starting)
        if decision.desired != have and not (decision.desired > have and held):
            log.info(
                "scale function=%s from=%d to=%d reason=%s",
                name, have, decision.desired, decision.reason,
            )  # fmt: skip
        if decision.desired > have and held:
            pass  # wait (see _lost), then start again
        elif decision.desired > have:
            for _ in range(decision.desired - have):
                if not self.launcher.launch(record):
                    break
        elif decision.desired < have:
            # Drain the least busy first; starting ones last (they are about to serve).
            victims = sorted(ready, key=lambda i: (i.in_flight, -i.since)) + starting
            for inst in victims[: have - decision.desired]:
                self._drain(inst, decision.reason)
        # Instances of an older revision go once the new revision serves (or nothing is wanted).
        if ready or decision.desired == 0:
            for inst in mine:
                if inst.revision != record.revision and inst.state != "draining":
                    self._drain(inst, f"revision {record.revision} replaces {inst.revision}")

    # --- apply -----------------------------------------------------------------------------
    def _evict(self, victim: Instance) -> None:
        """Stop an idle instance of another function to free its device; its function's scaler
        forgets it, so the device is not claimed straight back."""
        state = self._scalers.get(victim.function)
        if state is not None:
            self._scalers[victim.function] = replace(state, desired=max(0, state.desired - 1))
        self._drain(victim, "evicted for a placement")

    def _drain(self, inst: Instance, reason: str) -> None:
        if inst.state == "draining":
            return
        log.info("drain function=%s instance=%s reason=%s", inst.function, inst.instance_id, reason)
        was, inst.state = inst.state, "draining"
        self._spawn(self._send_unload(inst, was))

    async def _send_unload(self, inst: Instance, was: str) -> None:
        try:
            await self._commands.send(inst.node, UnloadCmd(inst.instance_id, self._drain_s))
        except CommandFailed as exc:
            log.warning("unload failed instance=%s error=%s", inst.instance_id, exc)
            # The node did not get it (NATS down, the node silent): the instance still runs
            # there, so it goes back to what it was and a later tick decides again.
            current = self._table.instances.get(inst.instance_id)
            if exc.transient and current is inst and inst.state == "draining":
                inst.state = was

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release_if_ready(self, record: FunctionRecord) -> None:
        """Queued requests go to a ready instance (should its event have been missed)."""
        name = record.spec.name
        if self._dispatcher.queued(name) and any(
            i.state == "ready" and i.revision == record.revision for i in self._table.of(name)
        ):
            self._dispatcher.release_waiters(name, record.revision)

    def _update_gauges(self, records: dict[str, FunctionRecord]) -> None:
        now = self._clock.now()
        update_gauges(self._metrics, self._table, self._dispatcher.queued, records, now)

    def replicas(self, function: str) -> dict[str, int]:
        record = self._registry.find(function)
        revision = record.revision if record else 0
        mine = [i for i in self._table.of(function) if i.revision == revision]
        state = self._scalers.get(function)
        ready = sum(1 for i in mine if i.state == "ready")
        starting = sum(1 for i in mine if i.state == "starting")
        # Before the first decision (just started or deployed) what runs is what is wanted.
        desired = state.desired if state else ready + starting
        return {"ready": ready, "starting": starting, "desired": desired}
