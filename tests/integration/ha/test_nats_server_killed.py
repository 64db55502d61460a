"""Issue 16, done when #3: any one NATS server is killed (SIGKILL), then restarted, in turn each
of the three, while clients invoke a function through both gateways: zero failed requests.
While a server is down, the control plane works too: a function is deployed and woken from
zero (registry write, leader election of the bucket if needed, load command, events)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sllm_cli.servers import NatsCluster
from tests.chaos import clients_on
from tests.cluster import AUTH

from .conftest import Stage

pytestmark = pytest.mark.integration


async def test_losing_any_one_nats_server_fails_no_request(stage: Stage) -> None:
    cluster = stage.up()
    assert isinstance(cluster.nats, NatsCluster)
    cluster.deploy("nk", stage.tiny.key, stage.tiny.nbytes, min=1, max=1, keep_alive="10m")
    woken: list[int] = []
    async with clients_on(cluster.url, "nk", to=cluster.urls, count=3) as tally:
        await tally.until("ok", 6)
        for i in range(3):
            cluster.kill(cluster.nats.servers[i])
            killed = time.monotonic()
            await tally.until("ok", 6, since=killed)
            if i == 0:  # the control plane with one server down: deploy, then a cold start
                await asyncio.to_thread(
                    cluster.deploy, "cold", stage.tiny.key, stage.tiny.nbytes, min=0, max=1
                )
                other = cluster.url_of("gw-1")
                async with httpx.AsyncClient(timeout=120) as client:
                    # the other gateway follows the registry by its watch; one whose NATS
                    # server was the one lost starts its watch again (about a second)
                    deadline = time.monotonic() + 10
                    while not (
                        await client.get(f"{other}/system/functions/cold", headers=AUTH)
                    ).is_success:
                        assert time.monotonic() < deadline, "gw-1 never learned of the deploy"
                        await asyncio.sleep(0.05)
                    r = await client.post(f"{other}/function/cold", json={"prompt": "hi"})
                woken.append(r.status_code)
            await asyncio.to_thread(cluster.nats.restart, i)
            back = time.monotonic()
            await tally.until("ok", 6, since=back)
    assert woken == [200]
    assert tally.wrong() == [], tally.wrong()
    counts = tally.counts()
    assert counts["ok"] == len(tally.outcomes), (counts, tally.errors())
