"""A gateway among several (issue 16): which one decides scale and placement, and what that one
hears from the others.

Every gateway routes, proxies and queues requests, follows the registry and builds its instance
table from heartbeats. One at a time, the holder of the lease (gateway.leadership), also
*decides*: its control loop scales and places. The others report their in-flight and queued
counts to it (gateway.load_reports), at once when a request starts waiting for an instance, and
hand it the manual scales they receive (``sllm.gateway.scale``).

Taking over: when this gateway wins the lease it reads the scale state the last leader left in
KV (gateway.scale_state) and hands it to ``on_lead``; only once that is done does ``deciding``
turn true, so the first decision already counts the loads the old leader sent. Losing the lease
(or stopping) calls ``on_follow`` and drops what was staged for KV.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from gateway.leadership import Leadership
from gateway.lease import LeaseConfig
from gateway.load_reports import LoadReports, total
from gateway.scale_state import Resumed, ScaleState
from sllm.bus import Bus, KeyValue, Message, Subscription
from sllm.clock import Clock
from sllm.errors import ProtocolError, SllmError, Unavailable
from sllm.messages import (
    GATEWAY_SCALE_SUBJECT,
    CmdReply,
    FunctionLoad,
    ScaleRequest,
    StartRecord,
    decode_as,
    encode,
)
from sllm.tasks import cancel_all

log = logging.getLogger(__name__)

# 2 s: the leader answers a scale request in milliseconds; longer means nobody leads right now
# (a takeover takes up to the lease TTL plus a poll), and the caller is told to retry.
SCALE_TIMEOUT_S = 2.0
# 0.5 s between attempts to read the scale state at a takeover (NATS may be electing a leader
# for the bucket); the lease lapses by itself if NATS stays away.
RESUME_RETRY_S = 0.5


@dataclass
class PeerHooks:
    """What the gateway's own parts do when this gateway starts or stops deciding, and when a
    manual scale reaches the leader."""

    on_lead: Callable[[Resumed], Awaitable[None]]
    on_follow: Callable[[], None]
    on_scale: Callable[[str, int], None]
    # requests of a function wait at another gateway (heard while this one decides)
    on_queued: Callable[[str], None] = lambda function: None


class Peers:
    def __init__(
        self,
        bus: Bus,
        lease_kv: KeyValue,
        scale_kv: KeyValue,
        clock: Clock,
        me: str,
        own_load: Callable[[], dict[str, FunctionLoad]],
        hooks: PeerHooks,
        lease: LeaseConfig | None = None,
    ) -> None:
        self._bus = bus
        self._clock = clock
        self.me = me
        self._hooks = hooks
        self.leadership = Leadership(lease_kv, me, clock, lease, on_change=self._on_change)
        self.reports = LoadReports(bus, me, clock, own_load, on_queued=self._queued_elsewhere)
        self.scale_state = ScaleState(scale_kv, clock)
        self._ready_term = 0  # the term whose takeover is complete
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._transition: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None

    # --- the control loop's questions (gateway.role.Role) -----------------------------------
    def deciding(self) -> bool:
        """Whether this gateway may decide now: it holds the lease and has taken over."""
        return self.leadership.leader and self._ready_term == self.leadership.term

    @property
    def term(self) -> int:
        return self.leadership.term

    def others_load(self) -> dict[str, FunctionLoad]:
        """In-flight and queued requests per function at the other gateways (fresh reports)."""
        return total({}, self.reports.reports, self.me, self._clock.now())

    def desired(self, function: str, desired: int) -> None:
        self.scale_state.set_desired(function, desired, self.term)

    def forget(self, function: str) -> None:
        self.scale_state.forget(function)

    async def booked(self, record: StartRecord) -> bool:
        if not self.deciding():
            return False
        try:
            # the desired count that asked for this load first: a takeover that finds the
            # load finds the count that wanted it (and does not drain it as surplus)
            await self.scale_state.flush()
            await self.scale_state.booked(replace(record, term=self.term))
        except (Unavailable, TimeoutError) as exc:
            # KV has been away for its whole retry window: load anyway (serving first); only
            # a takeover within this load's start could then start it twice
            log.warning("start record not kept instance=%s: %s", record.instance_id, exc)
        return True

    def gone(self, instance_id: str) -> None:
        self.scale_state.seen(instance_id)

    # --- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe, then run the lease, the reports and the state flusher in the background.
        The first lease step is taken here, so a lone gateway leads as soon as it is up."""
        await self.reports.subscribe()
        self._subs.append(await self._bus.subscribe(GATEWAY_SCALE_SUBJECT, self._on_scale))
        await self.leadership.step()
        if self._transition is not None:  # it leads: take over before serving
            await asyncio.gather(self._transition, return_exceptions=True)
        for run in (self.leadership.run, self.reports.run, self.scale_state.run):
            self._spawn(run())

    async def stop(self) -> None:
        """Stop deciding, give the lease up at once (a follower need not wait out its TTL).
        Once; a second call (SIGTERM began it, the app's shutdown ends it) waits for the first."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        await cancel_all(self._tasks)
        if self._transition is not None:
            await asyncio.gather(self._transition, return_exceptions=True)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # NATS may be down: nothing to undo there
                log.info("peers: unsubscribe failed: %s", exc)
        self._subs = []
        await self.scale_state.flush()
        await self.leadership.resign()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- leading and following -------------------------------------------------------------
    def _on_change(self, leader: bool, term: int) -> None:
        if self._transition is not None and not self._transition.done():
            self._transition.cancel()
        if leader:
            self._transition = asyncio.ensure_future(self._take_over(term))
        else:
            self._ready_term = 0
            self.scale_state.clear()
            self._hooks.on_follow()

    async def _take_over(self, term: int) -> None:
        while self.leadership.leader and self.leadership.term == term:
            try:
                resumed = await self.scale_state.load()
            except (Unavailable, TimeoutError) as exc:
                log.warning("takeover: cannot read the scale state yet: %s", exc)
                await self._clock.sleep(RESUME_RETRY_S)
                continue
            await self._hooks.on_lead(resumed)
            self._ready_term = term
            log.info(
                "takeover done gateway=%s term=%d functions=%d unconfirmed_loads=%d",
                self.me, term, len(resumed.desired), len(resumed.starting),
            )  # fmt: skip
            return

    # --- what followers send the leader ----------------------------------------------------
    def _queued_elsewhere(self, function: str) -> None:
        if self.deciding():
            self._hooks.on_queued(function)

    def waiting(self) -> None:
        """A request started waiting here: report at once rather than at the next period, so
        the leader wakes the function without a report period's delay."""
        if not self.deciding():
            self._spawn(self._report_now())

    async def _report_now(self) -> None:
        try:
            await self.reports.publish()
        except Exception as exc:  # the periodic report carries the counts
            log.warning("gateway load report not sent: %s", exc)

    async def scale(self, function: str, replicas: int) -> None:
        """A manual scale: applied here when this gateway decides, else handed to the leader;
        ``Unavailable`` when no gateway leads right now."""
        if self.deciding():
            self._hooks.on_scale(function, replicas)
            return
        request = encode(ScaleRequest(function, replicas))
        try:
            raw = await self._bus.request(GATEWAY_SCALE_SUBJECT, request, SCALE_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(
                f"no gateway leads right now (one takes over within seconds): retry the scale "
                f"of {function!r}"
            ) from None
        reply = decode_as(raw, CmdReply)
        if not reply.ok:
            raise SllmError(reply.message, code=reply.code or "scale_failed")

    async def _on_scale(self, msg: Message) -> bytes | None:
        if not self.deciding():
            return None  # the leader answers
        try:
            request = decode_as(msg.data, ScaleRequest)
        except ProtocolError as exc:
            return encode(CmdReply(False, "bad_request", exc.message))
        self._hooks.on_scale(request.function, request.replicas)
        return encode(CmdReply(True))
