"""Issue 14, row 3: the gateway SIGKILLed and started again. There is one gateway, so what it
had in flight is cut off and what is sent while it is down is refused (issue 16 adds more
gateways); what must hold: a cut-off stream is recognisably incomplete (no [DONE]), nothing is
wrong, and the restarted gateway finds the running instance instead of starting another."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.chaos import clients_on
from tests.cluster import AUTH

from .conftest import Stage

pytestmark = pytest.mark.integration


async def test_a_restarted_gateway_adopts_the_instance_and_nothing_is_wrong(stage: Stage) -> None:
    cluster = stage.up()
    cluster.deploy("kg", stage.tiny.key, stage.tiny.nbytes, min=0, max=1, keep_alive="10m")
    async with clients_on(cluster.url, "kg", count=3) as tally:  # its references wake it
        await tally.until("ok", 4)
        async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH) as admin:
            (before,) = (await admin.get("/system/functions/kg")).json()["instances"]
        cluster.kill(cluster.gateway)
        killed = time.monotonic()
        await tally.until("refused", 2, since=killed)
        await asyncio.to_thread(cluster.start_gateway)
        back = time.monotonic()
        await tally.until("ok", 6, since=back)
    assert tally.wrong() == [], tally.wrong()
    after = tally.between(back).counts()
    assert after["ok"] == sum(after.values()), after
    async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH) as admin:
        (inst,) = (await admin.get("/system/functions/kg")).json()["instances"]
        metrics = (await admin.get("/metrics")).text
    assert inst["id"] == before["id"]  # adopted, not started again
    assert 'sllm_wakes_total{function="kg"}' not in metrics
