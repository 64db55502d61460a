"""Tests that call an instance directly (to watch its engine, or to check it refuses strangers)
need its secret, which only the gateway role may read: from the nodes' heartbeats, as a
restarted gateway does. ``env`` holds ``SLLM_NATS_URL`` and the gateway's
``SLLM_NATS_SEED_FILE`` (``sllm_cli.servers.nats_client_env``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from sllm.bus import Message
from sllm.messages import HEARTBEATS, NodeHeartbeat, decode_as
from sllm.nats_bus import NatsBus

_known: dict[str, str] = {}


async def instance_secret_async(
    env: Mapping[str, str], instance_id: str, timeout_s: float = 30.0
) -> str:
    if instance_id in _known:
        return _known[instance_id]
    bus = await NatsBus.connect(
        env["SLLM_NATS_URL"], "test-secrets", seed_file=env["SLLM_NATS_SEED_FILE"]
    )
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_beat(msg: Message) -> None:
        for inst in decode_as(msg.data, NodeHeartbeat).instances:
            _known.setdefault(inst.instance_id, inst.secret) if inst.secret else None
            if inst.instance_id == instance_id and inst.secret and not found.done():
                found.set_result(inst.secret)

    try:
        await bus.subscribe(HEARTBEATS, on_beat)
        return await asyncio.wait_for(found, timeout_s)
    finally:
        await bus.close()


def instance_secret(env: Mapping[str, str], instance_id: str, timeout_s: float = 30.0) -> str:
    """The same from synchronous code (no event loop running in this thread)."""
    if instance_id in _known:
        return _known[instance_id]
    return asyncio.run(instance_secret_async(env, instance_id, timeout_s))
