"""The gateway's parts wired together (registry, instance table, dispatcher, controller,
proxy, metrics, logs, its peers) plus the bus subscriptions that feed them. Routes reach it
through ``request.app.state.gateway``; ``gateway.app`` builds it and runs ``start``/``stop`` in
the app's lifespan.

Every gateway serves; the one holding the lease also decides (``gateway.peers``): its
controller scales and places, the others' keep their tables and queues and report their load.
``lease_kv`` and ``scale_kv`` are the buckets the gateways share for that; left out (unit
tests), they are buckets of this gateway's own, and it decides alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from gateway.commands import COMMAND_TIMEOUT_S, NodeCommands
from gateway.controller import Controller
from gateway.dispatcher import Dispatcher
from gateway.instance_http import InstanceHttpClient
from gateway.instances import InstanceTable
from gateway.keys import KeyStore
from gateway.logs import LogBuffer
from gateway.metrics import GatewayMetrics
from gateway.migration.fits import MigrationFitStore
from gateway.migration.orchestrator import Migrator
from gateway.peers import PeerHooks, Peers
from gateway.placement import PolicyScheduler
from gateway.proxy import InstanceProxy
from gateway.registry import Registry
from gateway.scale_state import Resumed
from sllm.bus import Bus, KeyValue, MemoryKeyValue, Message, Subscription
from sllm.clock import Clock
from sllm.errors import ProtocolError
from sllm.instance_auth import auth_header
from sllm.messages import (
    EVENTS,
    HEARTBEATS,
    LOGS,
    FunctionLoad,
    InstanceEvent,
    LogLine,
    NodeHeartbeat,
    decode_as,
    node_of,
)
from sllm.settings import GatewaySettings
from sllm.spec import FunctionRecord
from sllm.tasks import cancel_all

log = logging.getLogger(__name__)

# settle_s (3 s): nodes beat every 2 s by default, so after 3 s a restarted gateway has heard
# from every live node and knows which instances already run.
#
# 1 s: an instance's /healthz answers in milliseconds; one that takes longer is not serving.
PROBE_TIMEOUT_S = 1.0

M = TypeVar("M")


@dataclass
class GatewayService:
    settings: GatewaySettings
    bus: Bus
    kv: KeyValue
    clock: Clock
    http: InstanceHttpClient
    scheduler: PolicyScheduler | None = None
    tick_s: float = 0.5
    settle_s: float = 3.0
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    logs: LogBuffer = field(default_factory=LogBuffer)
    lease_kv: KeyValue = field(default_factory=MemoryKeyValue)
    scale_kv: KeyValue = field(default_factory=MemoryKeyValue)

    def __post_init__(self) -> None:
        self.registry = Registry(self.kv)
        self.registry.on_change(self._on_function_change)
        self.keys = KeyStore(self.kv, self.clock)
        self.table = InstanceTable(self.settings.node_timeout_s)
        self.dispatcher = Dispatcher(
            self.table,
            self.clock,
            self.settings.queue_size,
            self.settings.wake_timeout_s,
            on_wait=self._on_wait,
            expected_start=lambda fn: self.controller.expected_start(fn),
        )
        scheduler = self.scheduler or PolicyScheduler(self.settings.policy)
        self.scheduler = scheduler
        # The resume-cost fits placements use, learned from migrations and kept in the bucket.
        self.fits = MigrationFitStore(self.kv, scheduler.migration)
        # Live migration: operators' POST /system/migrate and the scheduler's decisions
        self.migrator = Migrator(
            self.table, self.registry, self.dispatcher, self.bus, self.clock,
            models=self.fits.models, fits=self.fits,
        )  # fmt: skip
        self.commands = NodeCommands(self.bus, COMMAND_TIMEOUT_S)
        self.peers = Peers(
            self.bus, self.lease_kv, self.scale_kv, self.clock, self.settings.gateway_id,
            self._own_load,
            PeerHooks(self._lead, self._follow, self._scale, lambda fn: self.controller.poke(fn)),
        )  # fmt: skip
        self.controller = Controller(
            self.registry,
            self.table,
            self.dispatcher,
            self.commands,
            scheduler,
            self.clock,
            self.metrics,
            stable_window_s=self.settings.stable_window_s,
            drain_s=min(self.settings.request_timeout_s, 600.0),
            tick_s=self.tick_s,
            settle_s=self.settle_s,
            probe=self._probe,
            role=self.peers,
            migrator=self.migrator,
        )
        self.resume_http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.request_timeout_s, connect=5.0)
        )
        self.probe_http = httpx.AsyncClient(timeout=PROBE_TIMEOUT_S)
        self.proxy = InstanceProxy(
            self.http, self.dispatcher, self.clock, self.metrics, self.resume_http,
            self.table.secret_at,
        )  # fmt: skip
        self._subs: list[Subscription] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.registry.load()
        # the migration fits are read when this gateway takes the lead (_lead): only the
        # leader places, and it must read what the last leader learned
        self._subs = [
            await self.bus.subscribe(HEARTBEATS, self._on_heartbeat),
            await self.bus.subscribe(EVENTS, self._on_event),
            await self.bus.subscribe(LOGS, self._on_log),
        ]
        await self.peers.start()
        self._loop_task = asyncio.create_task(self.controller.run(), name="gateway-control-loop")
        log.info(
            "gateway started id=%s functions=%d policy=%s deciding=%s",
            self.settings.gateway_id, len(self.registry.all()), self.settings.policy,
            self.peers.deciding(),
        )  # fmt: skip

    def begin_stop(self, grace_s: float) -> None:
        """SIGTERM: the server stops accepting connections and lets the requests in flight
        finish; event streams still running after ``grace_s`` end with an error event
        (InstanceProxy.streams_end), so their clients can tell them from a finished answer.
        Safe to call from a signal handler (it only wakes the event loop)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping, grace_s)

    def _stopping(self, grace_s: float) -> None:
        log.info("gateway stopping: streams still running end in %.1fs", grace_s)
        asyncio.get_running_loop().call_later(grace_s, self.proxy.streams_end.set)
        # hand the lease over now: another gateway decides within a lease poll, not a TTL
        self._stop_peers = asyncio.ensure_future(self.peers.stop())

    async def stop(self) -> None:
        await self.peers.stop()
        if self._loop_task is not None:
            await cancel_all([self._loop_task])
        await self.controller.stop()
        await self.registry.stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):  # NATS may be down: nothing to undo there
                await sub.unsubscribe()
        self._subs = []
        await self.resume_http.aclose()
        await self.probe_http.aclose()

    # --- among several gateways ---------------------------------------------------------------
    def _on_wait(self, function: str) -> None:
        """A request started waiting for an instance of ``function``."""
        self.controller.poke(function)
        self.peers.waiting()

    def _own_load(self) -> dict[str, FunctionLoad]:
        """This gateway's requests per function (what it reports to the leader)."""
        loads = {}
        for record in self.registry.all():
            name = record.spec.name
            load = FunctionLoad(self.dispatcher.in_flight(name), self.dispatcher.queued(name))
            if load.in_flight or load.queued:
                loads[name] = load
        return loads

    async def _lead(self, resumed: Resumed) -> None:
        await self.fits.load()  # the fits the last leader's migrations taught
        self.controller.resume(resumed)
        self.metrics.deciding.set(1)

    def _follow(self) -> None:
        self.controller.follow()
        self.metrics.deciding.set(0)

    def _scale(self, function: str, replicas: int) -> None:
        self.controller.scale(function, replicas)

    def _on_function_change(self, name: str, record: FunctionRecord | None) -> None:
        """The registry took a change (made here, by another gateway, or seen on reconnect)."""
        if record is None:
            self.dispatcher.forget(name)
            self.logs.forget(name)
        self.controller.poke(name)

    async def _probe(self, address: str, secret: str) -> bool:
        """Whether the instance at ``address`` serves: its /healthz answers 200 (ready)."""
        try:
            response = await self.probe_http.get(f"{address}/healthz", headers=auth_header(secret))
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _on_heartbeat(self, msg: Message) -> None:
        hb = _from_its_node(msg, NodeHeartbeat, "heartbeat")
        if hb is not None:
            self.controller.on_heartbeat(hb)

    async def _on_event(self, msg: Message) -> None:
        event = _from_its_node(msg, InstanceEvent, "instance event")
        if event is not None:
            self.controller.on_event(event)

    async def _on_log(self, msg: Message) -> None:
        line = _from_its_node(msg, LogLine, "log line")
        if line is not None:
            self.logs.add(line)


def _from_its_node(msg: Message, cls: type[M], what: str) -> M | None:
    """The message, if it decodes and names the node whose subject it came on (NATS lets a
    node publish only under its own ``sllm.node.<node>.``, so a node cannot speak for
    another); else None, with a log line."""
    try:
        message = decode_as(msg.data, cls)
    except ProtocolError as exc:
        log.warning("dropped %s on %s: %s", what, msg.subject, exc.message)
        return None
    claimed = getattr(message, "node_id", "")
    if claimed != node_of(msg.subject):
        log.warning("dropped %s on %s: it names node %r", what, msg.subject, claimed)
        return None
    return message
