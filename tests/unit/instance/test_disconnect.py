"""``sllm.disconnect.unless_client_gone`` (instance side): a client that leaves first cancels the
work, after ``on_gone`` (what a cancellation cannot reach, e.g. a worker thread's generations)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sllm.disconnect import ClientGone, unless_client_gone


async def test_the_result_comes_back_and_on_gone_is_not_called() -> None:
    called: list[str] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def work() -> int:
        return 7

    assert await unless_client_gone(receive, work(), lambda: called.append("gone")) == 7
    assert called == []


async def test_a_gone_client_calls_on_gone_then_cancels_the_work() -> None:
    order: list[str] = []
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await started.wait()
        return {"type": "http.disconnect"}

    async def work() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            order.append("work cleaned up")  # consumers.aiter_events cancels the engine here
        return 0

    with pytest.raises(ClientGone):
        await unless_client_gone(receive, work(), lambda: order.append("on_gone"))
    assert order == ["on_gone", "work cleaned up"]
