"""Gauges of the current state (nodes, instances per function and state, queued requests),
set from the instance table on every control-loop tick."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.instances import InstanceTable
from gateway.metrics import GatewayMetrics

STATES = ("starting", "ready", "draining", "unreachable")


def update_gauges(
    metrics: GatewayMetrics,
    table: InstanceTable,
    queued: Callable[[str], int],
    functions: Iterable[str],
    now: float,
) -> None:
    metrics.nodes.set(len(table.live_nodes(now)))
    for name in functions:
        counts = dict.fromkeys(STATES, 0)
        for inst in table.of(name):
            counts[inst.state] = counts.get(inst.state, 0) + 1
        for state, n in counts.items():
            metrics.instances.labels(name, state).set(n)
        metrics.queued.labels(name).set(queued(name))
