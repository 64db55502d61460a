"""``sllm.disconnect.unless_client_gone`` (gateway side): the exchange is cancelled (its cleanup run) when the
client's ASGI ``receive`` says ``http.disconnect`` first, and untouched otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sllm.disconnect import ClientGone, unless_client_gone


class Client:
    """An ASGI ``receive`` whose ``http.disconnect`` comes when the test says so."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_the_answer_comes_back_when_the_client_stays() -> None:
    client = Client()

    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await unless_client_gone(client.receive, work()) == "answer"


async def test_an_error_of_the_work_reaches_the_caller() -> None:
    async def work() -> str:
        raise ValueError("instance said no")

    with pytest.raises(ValueError, match="instance said no"):
        await unless_client_gone(Client().receive, work())


async def test_a_client_that_leaves_cancels_the_work_after_its_cleanup() -> None:
    client = Client()
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # an answer that never comes
        finally:
            cleaned.set()  # the proxy closes the instance connection here
        return "never"

    async def leave() -> None:
        await started.wait()
        client.gone.set()

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientGone) as caught:
        await unless_client_gone(client.receive, work())
    await leaving
    assert cleaned.is_set() and caught.value.status == 499


async def test_body_messages_before_the_disconnect_are_skipped() -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def work() -> str:
        await asyncio.Event().wait()
        return "never"

    with pytest.raises(ClientGone):
        await unless_client_gone(receive, work())
