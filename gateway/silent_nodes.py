"""Nodes that stopped beating (issue 14): a NATS outage silences every node while the nodes and
their instances run on, and must not become a serving outage. So a silent node is not dropped
with its instances: its instances are asked directly whether they still serve (``/healthz``,
at most every ``PROBE_EVERY_S`` per node); those that answer stay routable, those that do not
are dropped, and the node with them once none answers (``InstanceTable.on_probe``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gateway.instances import InstanceTable, ReadyChange
from sllm.clock import Clock

log = logging.getLogger(__name__)

Probe = Callable[[str, str], Awaitable[bool]]
"""Whether the instance at an address (called with its secret) serves: /healthz says 200."""
# Seconds between health checks of a silent node's instances.
PROBE_EVERY_S = 1.0


async def never_answers(address: str, secret: str) -> bool:
    return False


class SilentNodes:
    """``spawn`` runs the probes; ``after`` takes what a probe round changed."""

    def __init__(
        self,
        table: InstanceTable,
        clock: Clock,
        probe: Probe,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        after: Callable[[ReadyChange], None],
    ) -> None:
        self._table = table
        self._clock = clock
        self._probe = probe
        self._spawn = spawn
        self._after = after
        self.probing: dict[str, float] = {}  # silent node -> when its last probe started

    def check(self, now: float) -> None:
        silent = self._table.silent_nodes(now)
        for node_id in [n for n in self.probing if n not in silent]:
            del self.probing[node_id]
        for node_id in silent:
            if now - self.probing.get(node_id, -PROBE_EVERY_S) >= PROBE_EVERY_S:
                self.probing[node_id] = now
                self._spawn(self._probe_node(node_id))

    async def _probe_node(self, node_id: str) -> None:
        targets = [
            (i.instance_id, i.address, i.secret)
            for i in self._table.instances.values()
            if i.node == node_id and i.address and i.state in ("ready", "unreachable")
        ]
        results = await asyncio.gather(*(self._probe(a, secret) for _, a, secret in targets))
        answered = {target[0]: ok for target, ok in zip(targets, results, strict=True)}
        now = self._clock.now()
        silent_s = now - self._table.nodes[node_id].seen if node_id in self._table.nodes else 0.0
        reason = (
            f"node {node_id} sent no heartbeat for {silent_s:.0f}s and the instance does not "
            "answer its health check"
        )
        change = self._table.on_probe(node_id, answered, now, reason)
        if node_id not in self._table.nodes:
            self.probing.pop(node_id, None)
            log.warning("node gone node=%s silent_s=%.1f", node_id, silent_s)
        self._after(change)
