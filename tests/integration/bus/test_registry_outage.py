"""The registry across a real NATS outage (issue 14, bug 1): a write during the outage fails
with 503 and is not applied when NATS comes back; the in-memory copy serves on meanwhile and
follows the bucket again afterwards (another gateway's writes reach it)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from gateway.registry import BUCKET, Registry
from sllm.errors import Unavailable
from sllm.nats_bus import NatsBus
from sllm.spec import FunctionRecord, FunctionSpec
from sllm_cli.servers import free_port, start_nats

pytestmark = pytest.mark.integration


def record(name: str) -> FunctionRecord:
    return FunctionRecord(FunctionSpec(name=name, model="m"), f"checkpoints/{name}/k", 10)


async def until(predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def test_a_write_during_an_outage_fails_and_never_lands(tmp_path: Path) -> None:
    port = free_port()
    nats = start_nats(tmp_path / "nats", port=port)
    url = f"nats://127.0.0.1:{port}"
    ours = await NatsBus.connect(url, "gateway-1", buffer=False)
    theirs = await NatsBus.connect(url, "gateway-2", buffer=False)
    registry = Registry(await ours.key_value(BUCKET), retry_s=0.2)
    other = Registry(await theirs.key_value(BUCKET), retry_s=0.2)
    try:
        await registry.load()
        await other.load()
        await registry.create(record("a"))
        await registry.create(record("b"))
        await until(lambda: other.find("b") is not None)

        nats.process.send_signal(signal.SIGKILL)
        nats.process.wait()
        await until(lambda: not ours.nc.is_connected)
        with pytest.raises(Unavailable, match="not connected"):
            await registry.delete("a")
        with pytest.raises(Unavailable):
            await registry.create(record("c"))
        assert registry.find("a") is not None  # the copy serves on

        nats = start_nats(tmp_path / "nats", port=port)
        await until(lambda: ours.nc.is_connected and theirs.nc.is_connected)
        await until(lambda: registry.resyncs >= 1 and other.resyncs >= 1)
        # neither write was sent late
        await asyncio.sleep(1.0)
        kv = await ours.key_value(BUCKET)
        assert await kv.get("fn.a") is not None and await kv.get("fn.c") is None
        assert registry.find("a") is not None and registry.find("c") is None
        # and the copy follows the bucket again: another gateway's delete reaches it
        await other.delete("b")
        await until(lambda: registry.find("b") is None)
    finally:
        await registry.stop()
        await other.stop()
        await ours.close()
        await theirs.close()
        nats.stop()
