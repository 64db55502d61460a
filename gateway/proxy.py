"""Proxying a request to an instance: pick (or wait for) one, send, pass the answer through
unbuffered.

- A request that fails before any byte came back (connection refused or reset, the instance
  died, or it answered 503 while draining) is retried once on another instance.
- Once bytes flowed, a broken stream is not retried (the client already has part of the
  answer): an event stream ends with an ``error`` event, a JSON answer is cut short.
- The in-flight count taken by the dispatcher is given back when the body is finished or the
  client goes away.
- When the gateway is stopping (SIGTERM, ``streams_end`` set once its grace has passed), an
  event stream still running ends with a ``gateway_stopping`` error event at its next chunk,
  rather than being cut without a word when the process exits.
- A client that disconnects while its answer is not ready yet (queued for a cold start, or
  waiting for a JSON answer, which comes back whole at the end of the generation) drops the
  exchange when the caller passes its ASGI ``receive``: the instance connection is closed, and
  the instance, seeing its own client gone, cancels the generation. Starlette cancels nothing
  by itself there; a streamed answer notices when a send fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from starlette.types import Receive

from gateway.dispatcher import Dispatcher
from gateway.instance_http import (
    InstanceHttpClient,
    InstanceResponse,
    ResponseTimeout,
    UpstreamError,
)
from gateway.instances import Instance
from gateway.metrics import GatewayMetrics
from gateway.migration.resume import StreamResumer
from gateway.migration.splice import follow_moves
from gateway.sse import sse
from sllm.clock import Clock
from sllm.disconnect import unless_client_gone
from sllm.errors import SllmError, Unavailable
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)


class UpstreamTimeout(SllmError):
    code = "upstream_timeout"
    status = 504


@dataclass
class Upstream:
    """An instance's answer whose status, headers and first chunk have arrived."""

    instance: Instance
    response: InstanceResponse
    first: bytes
    rest: AsyncIterator[bytes]
    started: float
    released: bool = False

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        value: str = self.response.headers.get("content-type", "application/json")
        return value

    @property
    def is_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")


class InstanceProxy:
    def __init__(
        self,
        client: InstanceHttpClient,
        dispatcher: Dispatcher,
        clock: Clock,
        metrics: GatewayMetrics,
        resume_client: httpx.AsyncClient,
        secret_at: Callable[[str], str] = lambda address: "",
    ) -> None:
        """``resume_client`` opens the continuation of a stream moved by a live migration
        (``gateway.migration``; rare, so httpx is fine there), at an instance whose secret
        ``secret_at(address)`` gives."""
        self._client = client
        self._secret_at = secret_at
        self._resume_client = resume_client
        self._dispatcher = dispatcher
        self._clock = clock
        self._metrics = metrics
        # set when a stopping gateway's grace for streams is over (GatewayService.begin_stop)
        self.streams_end = asyncio.Event()

    async def open(
        self,
        record: FunctionRecord,
        path: str,
        body: bytes,
        started: float,
        receive: Receive | None = None,
    ) -> Upstream:
        """Send ``body`` to ``path`` of an instance of ``record``; retried once elsewhere when
        nothing came back. Raises Unavailable (503), UpstreamTimeout (504) or the queue's
        errors (429, 503); with the client's ``receive``, ClientGone (499) when it disconnects
        before the answer started."""
        opening = self._open(record, path, body, started)
        return await (opening if receive is None else unless_client_gone(receive, opening))

    async def _open(
        self, record: FunctionRecord, path: str, body: bytes, started: float
    ) -> Upstream:
        name = record.spec.name
        exclude: set[str] = set()
        for attempt in (1, 2):
            inst, waited = await self._dispatcher.acquire(name, record.revision, exclude)
            if waited > 0:
                self._metrics.queue_wait.labels(name).observe(waited)
            try:
                upstream = await self._send(inst, path, body, started)
            except asyncio.CancelledError:
                self._dispatcher.release(inst)  # the client went away while we waited
                raise
            except ResponseTimeout:
                self._dispatcher.release(inst)
                raise UpstreamTimeout(
                    f"function {name!r}: instance {inst.instance_id} did not answer in time"
                ) from None
            except UpstreamError as exc:
                self._dispatcher.release(inst)
                if inst.state == "ready":
                    inst.state = "unreachable"
                log.warning(
                    "instance unreachable function=%s instance=%s error=%s",
                    name, inst.instance_id, exc,
                )  # fmt: skip
                reason = f"instance {inst.instance_id} failed before answering: {exc}"
            else:
                if upstream.status != 503 or attempt == 2:
                    return upstream
                await upstream.response.aclose()
                self._dispatcher.release(inst)
                reason = f"instance {inst.instance_id} is not taking requests (503)"
            exclude.add(inst.instance_id)
            if attempt == 1:
                self._metrics.retries.labels(name).inc()
        raise Unavailable(f"function {name!r}: {reason}")

    async def _send(self, inst: Instance, path: str, body: bytes, started: float) -> Upstream:
        response = await self._client.post(f"{inst.address}{path}", body, secret=inst.secret)
        try:
            chunks = response.aiter_raw()
            first = b""
            async for chunk in chunks:
                if chunk:
                    first = chunk
                    break
        except BaseException:
            await response.aclose()
            raise
        self._metrics.ttft.labels(inst.function).observe(self._clock.now() - started)
        return Upstream(inst, response, first, chunks, started)

    async def read_all(self, upstream: Upstream, receive: Receive | None = None) -> bytes:
        """The whole answer (non-stream use), then the instance is released. With the client's
        ``receive``: ClientGone (499) when it disconnects first."""
        reading = self._read_all(upstream)
        return await (reading if receive is None else unless_client_gone(receive, reading))

    async def _read_all(self, upstream: Upstream) -> bytes:
        parts = [upstream.first]
        try:
            async for chunk in upstream.rest:
                parts.append(chunk)
        except UpstreamError as exc:
            log.warning(
                "answer broke function=%s instance=%s error=%r",
                upstream.instance.function, upstream.instance.instance_id, exc,
            )  # fmt: skip
            raise Unavailable(
                f"instance {upstream.instance.instance_id} stopped before the answer was "
                "complete (the instance or its node failed); retry the request"
            ) from None
        finally:
            await self.finish(upstream)
        return b"".join(parts)

    async def passthrough(self, upstream: Upstream) -> AsyncIterator[bytes]:
        """The answer's bytes as they come; a broken event stream ends with an error event."""
        try:
            # a streamed request may move to another instance mid-way (live migration)
            resume = StreamResumer(
                self._resume_client, [upstream.instance.address or ""], self._secret_at
            )
            async for chunk in follow_moves(upstream.first, upstream.rest, resume):
                yield chunk
                if self.streams_end.is_set() and upstream.is_stream:
                    log.info(
                        "stream ended: gateway stopping function=%s instance=%s",
                        upstream.instance.function, upstream.instance.instance_id,
                    )  # fmt: skip
                    yield sse(STOPPING_ERROR)
                    return
        except (UpstreamError, httpx.TransportError) as exc:
            log.warning(
                "stream broke function=%s instance=%s error=%r",
                upstream.instance.function, upstream.instance.instance_id, exc,
            )  # fmt: skip
            if upstream.is_stream:
                yield sse(broken_stream_error(upstream, exc))
        finally:
            await self.finish(upstream)

    async def finish(self, upstream: Upstream) -> None:
        """Give the in-flight slot back (once), then close the instance's answer. The slot goes
        first: when the client went away this runs inside a cancelled scope, where the await
        below may not complete."""
        if not upstream.released:
            upstream.released = True
            self._dispatcher.release(upstream.instance)
            self._metrics.latency.labels(upstream.instance.function).observe(
                self._clock.now() - upstream.started
            )
        await upstream.response.aclose()


STOPPING_ERROR = {
    "error": {
        "code": "gateway_stopping",
        "message": "this gateway is shutting down and its grace for streams is over: send the "
        "request again (another gateway serves it)",
    }
}


def broken_stream_error(upstream: Upstream, exc: Exception) -> dict[str, object]:
    """The last event of a stream the instance broke off. The transport's own words
    (``IncompleteReadError: 0 bytes read ...``) go to the log, not to the client."""
    return {
        "error": {
            "code": "instance_failed",
            "message": f"instance {upstream.instance.instance_id} stopped before the answer "
            "was complete (the instance or its node failed); retry the request",
        }
    }


def error_from_upstream(status: int, body: bytes) -> SllmError:
    """An instance's 4xx/5xx error as a typed error with the same code and status, except a
    500: the instance failed, which to the client is a 502 (bad gateway), never a bare 500.
    A body that is not our JSON error (a server's own "Internal Server Error") is quoted."""
    text = body.decode("utf-8", errors="replace")[:500]
    code, message = "instance_error", f"the instance answered {status}: {text}"
    try:
        parsed = json.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code", code))
            message = str(err.get("message", message))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        pass
    return SllmError(message, code=code, status=502 if status == 500 else status)
