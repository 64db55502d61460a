"""Stopping a non-streaming answer's work when its HTTP client goes away.

Starlette cancels nothing when a client disconnects while a JSON endpoint is still awaiting its
result (a streamed response notices, because sending fails): generation would go on to
max_tokens for nobody. ``unless_client_gone`` races the work against the ASGI ``http.disconnect``
message and cancels the work when the client wins; cancelling an awaited generation cancels its
engine request (``runtime.engine.consumers.aiter_events``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # body messages: the caller read the body already, so these are empty


async def unless_client_gone(
    receive: Receive, work: Awaitable[T], on_gone: Callable[[], None] | None = None
) -> T:
    """Await ``work``; if the client disconnects first, call ``on_gone`` (work a cancellation
    cannot reach, such as a worker thread, is stopped there), cancel ``work``, wait until it
    ended, and raise ``ClientGone``. Call it once the request body was read (``receive`` then
    yields only ``http.disconnect``)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves: take both down with us
        task.cancel()
        gone.cancel()
        raise
    if task.done():
        gone.cancel()
        return task.result()
    if gone.exception() is not None:  # the server cannot tell us: just wait for the answer
        return await task
    if on_gone is not None:
        on_gone()
    task.cancel()
    await asyncio.wait((task,))  # its finally blocks (engine.cancel) have run after this
    if not task.cancelled():
        task.exception()  # finished with an error meanwhile: nobody is left to receive it
    raise ClientGone
