"""In-flight reports: the leader adds the newest fresh report of every other gateway to its own
counts (gateway.load_reports, pure parts), and the reporter round-trips over a bus."""

from __future__ import annotations

from gateway.load_reports import LoadReports, Received, keep_newest, total
from sllm.bus import MemoryBus
from sllm.clock import ManualClock
from sllm.messages import FunctionLoad, GatewayLoad


def test_total_adds_fresh_reports_to_its_own() -> None:
    reports = {
        "b": Received(GatewayLoad("b", 4, {"chat": FunctionLoad(3, 1)}), at=9.5),
        "c": Received(
            GatewayLoad("c", 9, {"chat": FunctionLoad(2, 0), "tldr": FunctionLoad(0, 5)}), at=8.0
        ),
        "d": Received(GatewayLoad("d", 1, {"chat": FunctionLoad(100, 0)}), at=6.0),  # stale
    }
    got = total({"chat": FunctionLoad(1, 0)}, reports, "a", now=10.0, max_age_s=3.0)
    assert got == {"chat": FunctionLoad(6, 1), "tldr": FunctionLoad(0, 5)}


def test_an_older_report_does_not_replace_a_newer_one() -> None:
    kept = keep_newest({}, GatewayLoad("b", 5, {"chat": FunctionLoad(1, 0)}), 1.0)
    kept = keep_newest(kept, GatewayLoad("b", 4, {"chat": FunctionLoad(9, 0)}), 2.0)
    assert kept["b"].report.seq == 5 and kept["b"].at == 1.0


async def test_reports_reach_the_other_gateways() -> None:
    bus, clock = MemoryBus(), ManualClock(100.0)
    a = LoadReports(bus, "a", clock, lambda: {"chat": FunctionLoad(2, 1)})
    b = LoadReports(bus, "b", clock, lambda: {"chat": FunctionLoad(1, 0)})
    await a.subscribe()
    await b.subscribe()
    await a.publish()
    await b.publish()
    assert b.total() == {"chat": FunctionLoad(3, 1)} == a.total()
    clock.advance(3.5)  # nobody reported since: each sees only its own
    assert a.total() == {"chat": FunctionLoad(2, 1)}
    await bus.publish("sllm.gateway.load", b"not msgpack")  # dropped, no crash
