"""The leader's scale state in KV, so a gateway that takes the lease over goes on from where the
last leader was instead of from what it happens to have heard (issue 16).

Bucket ``sllm-scale`` (replicated like the others, ``SLLM_NATS_REPLICAS``), written only by
the leader:
- ``desired.<function>``: ``ScaleRecord``, the function's desired instance count, written when
  it changes. A new leader starts each function's autoscaler from it, so a scale-up decided
  but not yet fully launched, or a manual scale, is not forgotten.
- ``start.<instance id>``: ``StartRecord``, written *before* the load command is sent and
  deleted once a heartbeat or an event shows the instance (or it is given up). A new leader
  books these as starting: a load the old leader sent just before it died, which no heartbeat
  shows yet, is counted instead of being started a second time.

Timers (keep-alive, the scale-down window) are not kept: they run on each gateway's monotonic
clock, which another gateway cannot read. A new leader restarts them from its takeover, which
can only delay a scale-down, never hasten one.

Writes of desired counts are coalesced (the newest value of a key wins) and flushed in the
background every ``FLUSH_S``; a failed flush keeps its writes for the next one. A start record
is written before its load, awaited: that ordering is the point.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from sllm.bus import KeyValue
from sllm.clock import Clock
from sllm.errors import ProtocolError, Unavailable
from sllm.messages import ScaleRecord, StartRecord, decode_as, encode

log = logging.getLogger(__name__)

SCALE_BUCKET = "sllm-scale"
DESIRED = "desired."
START = "start."
# 0.25 s: a desired count reaches KV within a quarter second of the decision; a takeover takes
# seconds, so at most one decision's write is in the window between.
FLUSH_S = 0.25


@dataclass(frozen=True)
class Resumed:
    """What the last leader left: desired counts by function, and its unconfirmed loads."""

    desired: dict[str, int] = field(default_factory=dict)
    starting: list[StartRecord] = field(default_factory=list)


class ScaleState:
    def __init__(self, kv: KeyValue, clock: Clock, flush_s: float = FLUSH_S) -> None:
        self._kv = kv
        self._clock = clock
        self._flush_s = flush_s
        self._pending: dict[str, bytes | None] = {}
        self._written: dict[str, bytes] = {}
        self._flushing = asyncio.Lock()  # orders this gateway's writes; no thread waits on it

    async def load(self) -> Resumed:
        """Read the whole state (at a takeover). Unreadable records are skipped with a log line."""
        desired: dict[str, int] = {}
        starting: list[StartRecord] = []
        for key in await self._kv.keys():
            raw = await self._kv.get(key)
            if raw is None:
                continue
            try:
                if key.startswith(DESIRED):
                    desired[key[len(DESIRED) :]] = decode_as(raw, ScaleRecord).desired
                elif key.startswith(START):
                    starting.append(decode_as(raw, StartRecord))
            except ProtocolError as exc:
                log.warning("scale state: skipping unreadable key=%s error=%s", key, exc)
                continue
            self._written[key] = raw
        return Resumed(desired, starting)

    def set_desired(self, function: str, desired: int, term: int) -> None:
        """Record ``function``'s desired count (flushed in the background)."""
        self._stage(DESIRED + function, encode(ScaleRecord(desired, term)))

    def forget(self, function: str) -> None:
        """The function was deleted: drop its count."""
        self._stage(DESIRED + function, None)

    async def booked(self, record: StartRecord) -> None:
        """Record a load about to be sent; raises ``Unavailable`` if KV cannot take it (the
        caller decides whether to load anyway)."""
        key = START + record.instance_id
        value = encode(record)
        await self._kv.put(key, value)
        self._written[key] = value

    def seen(self, instance_id: str) -> None:
        """A heartbeat or event shows the instance, or it was given up: its record goes."""
        self._stage(START + instance_id, None)

    def _stage(self, key: str, value: bytes | None) -> None:
        if value is None and key not in self._written and key not in self._pending:
            return
        if value is not None and self._written.get(key) == value:
            self._pending.pop(key, None)
            return
        self._pending[key] = value

    async def flush(self) -> None:
        """Write what was staged; what fails stays staged (unless restaged meanwhile). One
        flush at a time: one that returns has written everything staged before it was called
        (a load's start record must not overtake the desired count that asked for it, which a
        background flush may be writing at that moment)."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        for key, value in batch.items():
            try:
                if value is None:
                    await self._kv.delete(key)
                    self._written.pop(key, None)
                else:
                    await self._kv.put(key, value)
                    self._written[key] = value
            except (Unavailable, TimeoutError) as exc:
                log.warning("scale state: %s not written (retried): %s", key, exc)
                self._pending.setdefault(key, value)

    def clear(self) -> None:
        """Stepped down: nothing staged is ours to write any more."""
        self._pending.clear()
        self._written.clear()

    async def run(self) -> None:
        """Flush every ``flush_s`` until cancelled."""
        while True:
            await self._clock.sleep(self._flush_s)
            if self._pending:
                await self.flush()
