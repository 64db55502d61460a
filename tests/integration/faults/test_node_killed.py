"""Issue 14, row 1: the node SIGKILLed under load and started again. Before: bare 500s, 10 s of
503 'LoadCmd no reply' in milliseconds, then 503 'no node is connected' though the node was
back. Now: requests in flight finish (the orphaned instance drains them), requests sent while
the node is down wait for it and are served by the restarted node, and nothing is wrong."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.chaos import clients_on
from tests.cluster import AUTH

from .conftest import Stage

pytestmark = pytest.mark.integration


async def node_live(url: str, node_id: str) -> bool:
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as admin:
        nodes = (await admin.get(f"{url}/system/nodes")).json()
    return any(n["node_id"] == node_id and n["live"] for n in nodes)


async def test_a_killed_node_is_waited_for_and_nothing_is_served_wrong(stage: Stage) -> None:
    cluster = stage.up()
    cluster.deploy("kn", stage.tiny.key, stage.tiny.nbytes, min=0, max=1, keep_alive="10m")
    async with clients_on(cluster.url, "kn", count=3) as tally:
        await tally.until("ok", 6)
        cluster.kill_node("a")  # SIGKILL, with requests in flight
        killed = time.monotonic()
        deadline = killed + 30
        while await node_live(cluster.url, "a"):  # the gateway notices the silence (2 s)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # requests keep arriving with no node at all
        down = tally.between(killed)
        assert down.counts()["error"] == 0, down.errors()  # none failed in milliseconds
        await asyncio.to_thread(cluster.start_node, "a")
        restarted = time.monotonic()
        await tally.until("ok", 6, since=restarted)
    assert tally.wrong() == [], tally.wrong()
    counts = tally.counts()
    assert counts["cut"] == 0 and counts["refused"] == 0, counts
    held = tally.between(killed, restarted)
    assert held.counts()["ok"] >= 1, held.counts()  # sent while the node was down, served after
    assert held.counts()["error"] == 0, held.errors()
    log = (cluster.root / "gateway.log").read_text()
    assert "Internal Server Error" not in log and "unhandled error" not in log
