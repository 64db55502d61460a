"""In-flight reports between gateways (Knative's activators report to its autoscaler the same
way): every gateway publishes its own counts per function on ``sllm.gateway.load`` every
``report_s``; the leader keeps the newest report of each gateway and adds them to its own, so
its autoscaler sees the load of the whole platform, wherever the requests arrived.

``total`` is pure: reports older than ``max_age_s`` are dropped (a gateway that died stops
counting after that), as are reports out of order (a lower ``seq`` than one already kept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sllm.bus import Bus, Message
from sllm.clock import Clock
from sllm.errors import ProtocolError
from sllm.messages import GATEWAY_LOAD_SUBJECT, FunctionLoad, GatewayLoad, decode_as, encode

log = logging.getLogger(__name__)

# 1 s, Knative's activator stat period; a report counts for 3 periods, so one lost report
# changes nothing and a dead gateway's load is forgotten within 3 s.
REPORT_S = 1.0
MAX_AGE_S = 3.0


@dataclass(frozen=True)
class Received:
    report: GatewayLoad
    at: float


def keep_newest(
    reports: Mapping[str, Received], report: GatewayLoad, now: float
) -> dict[str, Received]:
    """``reports`` with ``report`` folded in (unless an equal or newer one of that gateway is
    already there)."""
    kept = dict(reports)
    old = kept.get(report.gateway_id)
    if old is None or report.seq > old.report.seq:
        kept[report.gateway_id] = Received(report, now)
    return kept


def total(
    own: Mapping[str, FunctionLoad],
    reports: Mapping[str, Received],
    me: str,
    now: float,
    max_age_s: float = MAX_AGE_S,
) -> dict[str, FunctionLoad]:
    """Per function: this gateway's counts plus every fresh report of the others."""
    sums = {fn: (load.in_flight, load.queued) for fn, load in own.items()}
    for gateway_id, got in reports.items():
        if gateway_id == me or now - got.at > max_age_s:
            continue
        for fn, load in got.report.functions.items():
            in_flight, queued = sums.get(fn, (0, 0))
            sums[fn] = (in_flight + load.in_flight, queued + load.queued)
    return {fn: FunctionLoad(i, q) for fn, (i, q) in sums.items()}


class LoadReports:
    """Publishes this gateway's counts and collects the others' (every gateway does both, so
    whichever becomes leader already has the others' latest reports)."""

    def __init__(
        self,
        bus: Bus,
        me: str,
        clock: Clock,
        own: Callable[[], dict[str, FunctionLoad]],
        report_s: float = REPORT_S,
        max_age_s: float = MAX_AGE_S,
        on_queued: Callable[[str], None] | None = None,
    ) -> None:
        """``on_queued(function)``: a newer report of another gateway has requests of
        ``function`` waiting (the leader wakes its control loop rather than wait a tick)."""
        self._bus = bus
        self.me = me
        self._clock = clock
        self._own = own
        self._on_queued = on_queued
        self._report_s = report_s
        self._max_age_s = max_age_s
        self._seq = 0
        self.reports: dict[str, Received] = {}

    async def subscribe(self) -> None:
        await self._bus.subscribe(GATEWAY_LOAD_SUBJECT, self._on_report)

    async def _on_report(self, msg: Message) -> bytes | None:
        try:
            report = decode_as(msg.data, GatewayLoad)
        except ProtocolError as exc:
            log.warning("dropping a malformed gateway load report: %s", exc)
            return None
        if report.gateway_id == self.me:
            return None
        kept = keep_newest(self.reports, report, self._clock.now())
        fresh = kept.get(report.gateway_id) is not self.reports.get(report.gateway_id)
        self.reports = kept
        if fresh and self._on_queued is not None:
            for function, load in report.functions.items():
                if load.queued:
                    self._on_queued(function)
        return None

    async def publish(self) -> None:
        self._seq += 1
        await self._bus.publish(
            GATEWAY_LOAD_SUBJECT, encode(GatewayLoad(self.me, self._seq, self._own()))
        )

    def total(self) -> dict[str, FunctionLoad]:
        return total(self._own(), self.reports, self.me, self._clock.now(), self._max_age_s)

    async def run(self) -> None:
        """Publish every ``report_s`` until cancelled."""
        while True:
            try:
                await self.publish()
            except Exception as exc:  # NATS reconnecting: the next report carries the counts
                log.warning("gateway load report not sent: %s", exc)
            await self._clock.sleep(self._report_s)
