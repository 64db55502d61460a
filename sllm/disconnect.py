"""Stopping a non-streaming answer's work when its HTTP client goes away (the gateway's
exchange with an instance, the instance's generation).

Starlette cancels nothing when a client disconnects while an endpoint is still awaiting a JSON
result (a streamed response notices, because sending fails): the work would go on for nobody.
``unless_client_gone`` races the work against the ASGI ``http.disconnect`` message and cancels
the work when the client wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

from sllm.errors import SllmError

T = TypeVar("T")


class ClientGone(SllmError):
    """The client disconnected before its answer was ready; its work was cancelled. 499 is
    nginx's "client closed request": the answer reaches no one, only logs and metrics."""

    code = "client_gone"
    status = 499


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # body messages: the caller read the body already, so these are empty


async def unless_client_gone(
    receive: Receive, work: Awaitable[T], on_gone: Callable[[], None] | None = None
) -> T:
    """Await ``work``; if the client disconnects first, call ``on_gone`` (work a cancellation
    cannot reach, such as a worker thread, is stopped there), cancel ``work``, wait until its
    cleanup ran, and raise ``ClientGone``. Call it once the request body was read (``receive``
    then yields only ``http.disconnect``)."""
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
    await asyncio.wait((task,))  # its finally blocks have run after this
    if not task.cancelled():
        task.exception()  # finished with an error meanwhile: nobody is left to receive it
    raise ClientGone("the client disconnected before its answer was ready")
