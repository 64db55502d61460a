"""The lease loop (STYLE.md 2): read the key, ``lease.decide``, write through the KeyValue port.

The bucket is a JetStream KV bucket whose values expire after the lease TTL
(``open_lease_bucket``); ``Leadership.leader`` says, at any instant, whether this gateway may
decide scale and placement (gateway.lease explains why that is safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.lease import (
    FOLLOWER,
    LeaseConfig,
    LeaseState,
    Seen,
    decide,
    leading,
    on_written,
)
from sllm.bus import KeyValue
from sllm.clock import Clock
from sllm.errors import ProtocolError, StaleRevision, Unavailable
from sllm.messages import LeaseRecord, decode_as, encode

if TYPE_CHECKING:
    from sllm.nats_bus import NatsBus

log = logging.getLogger(__name__)

LEASE_BUCKET = "sllm-lease"
LEASE_KEY = "leader"


async def open_lease_bucket(bus: NatsBus, replicas: int, config: LeaseConfig) -> KeyValue:
    """The lease bucket on NATS: values live ``ttl_s`` (max age), one revision kept."""
    # A lease write must fail fast rather than retry past its own validity: retries stop well
    # inside the margin the leader keeps before its lease could expire.
    return await bus.key_value(
        LEASE_BUCKET,
        replicas=replicas,
        ttl_s=config.ttl_s,
        history=1,
        retry_s=config.renew_s,
    )


class Leadership:
    def __init__(
        self,
        kv: KeyValue,
        me: str,
        clock: Clock,
        config: LeaseConfig | None = None,
        on_change: Callable[[bool, int], None] | None = None,
    ) -> None:
        self._kv = kv
        self.me = me
        self._clock = clock
        self.config = config or LeaseConfig()
        self._state: LeaseState = FOLLOWER
        self._on_change = on_change
        self._told: tuple[bool, int] = (False, 0)  # (leader, term) last told to on_change
        self.holder: str | None = None  # the last holder seen, for /healthz and logs

    @property
    def leader(self) -> bool:
        return leading(self.config, self._state, self._clock.now())

    @property
    def term(self) -> int:
        """The revision at which this gateway took the lease (0: never)."""
        return self._state.term

    async def _read(self) -> Seen | None:
        try:
            entry = await self._kv.entry(LEASE_KEY)
        except (Unavailable, TimeoutError) as exc:
            log.warning("lease: cannot read %s: %s", LEASE_KEY, exc)
            return None
        if entry is None:
            return Seen(None)
        try:
            record = decode_as(entry.value, LeaseRecord)
        except ProtocolError as exc:
            # unreadable: treat as held (by nobody we know) until it expires
            log.warning("lease: unreadable value at revision %d: %s", entry.revision, exc)
            return Seen("?", entry.revision)
        return Seen(record.holder, entry.revision)

    async def step(self) -> None:
        """Gather, decide, apply: one read and at most one write."""
        seen = await self._read()
        if seen is not None:
            self.holder = seen.holder
        action, state = decide(self.config, self.me, self._state, seen, self._clock.now())
        self._state = state
        if action.kind != "wait":
            sent_at = self._clock.now()
            value = encode(LeaseRecord(self.me))
            revision: int | None
            try:
                if action.kind == "create":
                    revision = await self._kv.create(LEASE_KEY, value)
                else:
                    assert action.revision is not None
                    revision = await self._kv.update(LEASE_KEY, value, action.revision)
            except StaleRevision:
                revision = None
            except (Unavailable, TimeoutError) as exc:
                log.warning("lease: %s failed: %s", action.kind, exc)
                revision = -1
            if revision != -1:
                self._state = on_written(self._state, action, revision, sent_at)
                if revision is not None:
                    self.holder = self.me
        self._notify()

    def _notify(self) -> None:
        """Tell ``on_change`` when leading starts or stops, and when it goes on at a new term:
        a renewal whose reply was lost (NATS restarting) is renewed again at the revision the
        key shows, within one step, so leading never reads false in between; the term changes
        all the same, and whoever took over for the old term must take over again (seen in a
        fault run: the gateway led on, never decided again, a deleted function kept its
        instance)."""
        now_leader = self.leader
        told = (now_leader, self._state.term if now_leader else 0)
        if told == self._told:
            return
        was_leader, self._told = self._told[0], told
        if now_leader and was_leader:
            log.info("lease: %s leads on at a new term (term %d)", self.me, self._state.term)
        else:
            log.info(
                "lease: %s %s (term %d)",
                self.me,
                "became leader" if now_leader else "is no longer leader",
                self._state.term,
            )
        if self._on_change is not None:
            self._on_change(now_leader, self._state.term)

    async def run(self) -> None:
        """Step every ``poll_s`` until cancelled."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease step failed")
            await self._clock.sleep(self.config.poll_s)

    async def resign(self) -> None:
        """On a clean stop: give the lease up at once, so a follower need not wait out the TTL.
        Only while the lease is ours by time (nobody else can have written since)."""
        if not self.leader:
            return
        self._state = FOLLOWER
        self._notify()
        try:
            await self._kv.delete(LEASE_KEY)
        except (Unavailable, TimeoutError) as exc:
            log.warning("lease: resign failed (it expires by itself): %s", exc)
