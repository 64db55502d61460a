"""A client that disconnects from the gateway while its JSON request is generating stops the
generation on the instance: the gateway drops its upstream connection, the instance sees its
own client gone and cancels the engine request. Real gateway, node, instance and NATS.

The function is a plain custom handler shaped like templates/python-handler (a blocking
``ctx.generate``), over a tiny model with a long context, asked for 30,000 tokens without EOS
(minutes here): a request that is not cancelled cannot end by itself within the deadline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.instance_auth import auth_header
from tests.instance_secrets import instance_secret_async

from .conftest import AUTH, Cluster

pytestmark = pytest.mark.integration

KEY = "checkpoints/tiny/it-gateway-long"
LONG = 30_000
DEADLINE_S = 60.0
HANDLER = """
def handle(request, ctx):
    result = ctx.generate(prompt="hello", max_tokens=request["max_tokens"], ignore_eos=True)
    return {"text": result["text"], "finish_reason": result["finish_reason"]}
"""


def push_long_context_model(cluster: Cluster, tmp_path: Path) -> int:
    from runtime.ckpt.convert import convert_checkpoint
    from runtime.store.local import LocalStore
    from runtime.store.push import push_checkpoint
    from tests.tiny_model import TinyConfig, build_tiny_llama

    hf = build_tiny_llama(tmp_path / "hf", config=TinyConfig(max_position_embeddings=LONG + 512))
    index = convert_checkpoint(hf, tmp_path / "ckpt")
    push_checkpoint(tmp_path / "ckpt", LocalStore(cluster.root / "store"), KEY)
    return index.total_bytes


async def instance_health(http: httpx.AsyncClient, address: str, secret: str) -> dict[str, Any]:
    body: dict[str, Any] = (
        await http.get(f"{address}/healthz", headers=auth_header(secret))
    ).json()
    return body


async def test_json_request_through_the_gateway_is_cancelled_when_its_client_goes(
    cluster: Cluster, tmp_path: Path
) -> None:
    size = push_long_context_model(cluster, tmp_path)
    spec = {
        "name": "long",
        "model": "tiny-long",
        "handler": "long:handle",
        "auth": "public",
        "scale": {"min": 0, "max": 1, "keep_alive": "10m"},
    }
    deploy = {"spec": spec, "checkpoint": KEY, "checkpoint_bytes": size}
    deploy["handler_source"] = {"long.py": HANDLER}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{cluster.url}/system/functions", json=deploy, headers=AUTH)
        assert r.status_code == 201, r.text
        try:
            warm = await http.post(f"{cluster.url}/function/long", json={"max_tokens": 2})
            assert warm.status_code == 200, warm.text + cluster.log_tail("node.log")
            info = (await http.get(f"{cluster.url}/system/functions/long", headers=AUTH)).json()
            (inst,) = info["instances"]
            address = inst["address"]
            secret = await instance_secret_async(cluster.env, inst["id"])
            before = (await instance_health(http, address, secret))["cancelled"]

            body = json.dumps({"max_tokens": LONG}).encode()
            _reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(
                b"POST /function/long HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            deadline = time.monotonic() + DEADLINE_S
            while True:  # generating on the instance
                health = await instance_health(http, address, secret)
                if health["in_flight"] >= 1 and health["tokens_out"] > 0:
                    break
                assert time.monotonic() < deadline, f"never started: {health}"
                await asyncio.sleep(0.05)
            writer.close()
            await writer.wait_closed()

            deadline = time.monotonic() + DEADLINE_S
            while (health := await instance_health(http, address, secret))["in_flight"] > 0:
                assert time.monotonic() < deadline, (
                    f"still generating after the client left: {health}"
                )
                await asyncio.sleep(0.05)
            assert health["cancelled"] == before + 1
            # the gateway gave the instance's slot back
            info = (await http.get(f"{cluster.url}/system/functions/long", headers=AUTH)).json()
            assert [i["in_flight"] for i in info["instances"]] == [0]
        finally:
            await http.delete(f"{cluster.url}/system/functions/long", headers=AUTH)
