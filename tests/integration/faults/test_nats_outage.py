"""Issue 14, row 2 and bug 1: nats-server SIGKILLed and started again. Before: after 10 s
without heartbeats the gateway dropped the instances and answered 503 until NATS returned;
admin writes answered 500 TimeoutError, and a delete was buffered and applied on reconnect.
Now: instances that answer their health check keep serving through the outage, admin writes
answer 503 at once and are never applied later, and the registry follows the bucket again."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.chaos import clients_on
from tests.cluster import AUTH

from .conftest import Stage

pytestmark = pytest.mark.integration


async def live(admin: httpx.AsyncClient, node_id: str) -> bool:
    nodes = (await admin.get("/system/nodes")).json()
    return any(n["node_id"] == node_id and n["live"] for n in nodes)


async def test_a_nats_outage_is_not_a_serving_outage(stage: Stage) -> None:
    cluster = stage.up()
    cluster.deploy("no", stage.tiny.key, stage.tiny.nbytes, min=0, max=1, keep_alive="10m")
    cluster.deploy("keep", stage.tiny.key, stage.tiny.nbytes, min=0, max=1)
    async with (
        httpx.AsyncClient(base_url=cluster.url, headers=AUTH, timeout=10) as admin,
        clients_on(cluster.url, "no", count=3) as tally,
    ):
        await tally.until("ok", 4)
        cluster.kill(cluster.nats, signal.SIGKILL)
        down = time.monotonic()
        # admin writes: 503 at once, not a 500 after 5 s
        started = time.monotonic()
        r = await admin.delete("/system/functions/keep")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        assert time.monotonic() - started < 2.0
        spec = {"spec": {"name": "late", "model": "m"}, "checkpoint": "k/x", "checkpoint_bytes": 1}
        r = await admin.post("/system/functions", json=spec)
        assert r.status_code == 503, r.text
        deadline = time.monotonic() + 30
        while await live(admin, "a"):  # the node is silent at the gateway (2 s)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        silent = time.monotonic()
        await tally.until("ok", 8, since=silent)  # ... and its instance serves on
        cluster.start_nats()
        deadline = time.monotonic() + 60
        while not await live(admin, "a"):
            assert time.monotonic() < deadline, "the node's heartbeats did not come back"
            await asyncio.sleep(0.2)
        back = time.monotonic()
        await tally.until("ok", 4, since=back)
        # neither write was applied later, and writes work again
        await asyncio.sleep(1.0)
        names = [f["name"] for f in (await admin.get("/system/functions")).json()]
        assert "keep" in names and "late" not in names
        r = await admin.delete("/system/functions/keep")
        assert r.status_code == 204, r.text
    assert tally.wrong() == [], tally.wrong()
    assert tally.counts()["ok"] == len(tally.outcomes), tally.counts()
    assert tally.between(down, back).counts()["ok"] >= 8
    # ... and the gateway decides again after the outage: a deleted function's instance is
    # drained (a lost lease-renewal reply once left it leading at a term it never took over)
    cluster.clear(timeout_s=30)
