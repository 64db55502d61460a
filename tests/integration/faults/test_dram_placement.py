"""Issue 14, placement counts DRAM space: on a node whose DRAM tier holds one checkpoint, two
functions with different checkpoints take turns. Before: the second was placed on the free
CPU slot, its load failed with cache_full beside the first's pinned entry, and its requests
were refused (54 of 54) while the first stayed warm. Now the idle instance is evicted for it,
or the request waits until it is idle; every request is served."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.chaos import body
from tests.cluster import AUTH

from .conftest import Stage

pytestmark = pytest.mark.integration


async def test_two_functions_share_a_dram_tier_for_one_without_starving(stage: Stage) -> None:
    cluster = stage.up()
    # node "d" alone can hold only one of the two checkpoints in DRAM; node "a" is stopped
    cluster.kill_node("a")
    size = max(stage.tiny.nbytes, stage.other.nbytes)
    cluster.node_env["d"] = {"SLLM_DRAM_CAPACITY": str(int(size * 1.5)), "SLLM_POOL_SIZE": "1"}
    await asyncio.to_thread(cluster.start_node, "d")
    try:
        cluster.deploy("dram-a", stage.tiny.key, stage.tiny.nbytes, min=0, max=1, keep_alive="10m")
        cluster.deploy(
            "dram-b", stage.other.key, stage.other.nbytes, min=0, max=1, keep_alive="10m"
        )
        async with httpx.AsyncClient(timeout=180) as client:

            async def ask(name: str) -> str:
                r = await client.post(f"{cluster.url}/function/{name}", json=body("hello", False))
                assert r.status_code == 200, (name, r.text)
                text: str = r.json()["text"]
                return text

            # a, then b: a is idle and its DRAM entry pinned, so it is evicted for b (the
            # other way round is the same decision)
            first_a = await ask("dram-a")
            assert await ask("dram-b") != first_a  # other weights: the answers tell them apart
            described = await client.get(f"{cluster.url}/system/functions/dram-a", headers=AUTH)
            assert described.json()["instances"] == []  # a was evicted, not starved of b
        # and no load was sent where it could not fit (each would fail with cache_full)
        log = (cluster.root / "gateway.log").read_text()
        assert "instance failed function=dram-" not in log, log[-2000:]
    finally:
        cluster.nodes.pop("d").stop(timeout_s=30)
