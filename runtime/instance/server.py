"""The Instance HTTP API (shared contract): /healthz, /v1/generate, /v1/invoke, plus live
migration's /v1/migration/* routes (``runtime.migration.routes``).

Errors map to ``{"error": {"code", "message"}}`` with the error's status in one place
(``runtime.instance.http``); a stream that fails after it started ends with an error event. A client
that disconnects before its JSON answer is ready cancels the generation (``disconnect``); its
answer is then a 499 nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from runtime.backend.base import Backend
from runtime.engine.consumers import generate
from runtime.engine.prompts import Tokenizing, build_request, embedding_inputs
from runtime.engine.request import RequestState
from runtime.engine.sampling import SamplingDefaults
from runtime.instance.handlers import CustomHandler, HandlerContext
from runtime.instance.http import DONE, HANDLERS, error_event, json_body, sse
from runtime.instance.stream import started
from runtime.migration.handoff import MigrationHub
from runtime.migration.routes import migration_routes
from sllm.disconnect import unless_client_gone
from sllm.errors import InvalidInput, SllmError, Unavailable

log = logging.getLogger(__name__)


@dataclass
class InstanceService:
    """Everything the routes need. ``state``: starting | ready | draining."""

    function: str
    instance_id: str
    handler: str
    engine: Backend
    tok: Tokenizing
    defaults: SamplingDefaults
    context: HandlerContext
    custom: CustomHandler | None = None
    state: str = "starting"
    custom_in_flight: int = 0
    hub: MigrationHub = field(init=False)  # live migration's view of ``engine``

    def __post_init__(self) -> None:
        self.hub = MigrationHub(self.engine)

    def in_flight(self) -> int:
        return self.engine.load().in_flight + self.custom_in_flight

    async def drain(self, deadline_s: float) -> bool:
        """Refuse new requests; wait up to ``deadline_s`` for in-flight ones. True if all
        finished in time."""
        self.state = "draining"
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self.in_flight() > 0:
            remaining = end - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(0.05, remaining))
        return self.in_flight() == 0


def _check_ready(service: InstanceService) -> None:
    if service.state != "ready":
        raise Unavailable(f"instance {service.instance_id} is {service.state}")


async def _run_generate(service: InstanceService, body: Any, receive: Receive) -> Response:
    if service.handler == "embedding":
        raise InvalidInput("this is an embedding function: POST /v1/embed (/v1/embeddings)")
    chat = service.handler != "completion"
    state = build_request(body, service.tok, service.defaults, chat=chat)
    return await _respond(service, state, receive, stream=body.get("stream", False) is True)


async def _respond(
    service: InstanceService, state: RequestState, receive: Receive, *, stream: bool
) -> Response:
    if stream:
        events = await started(service.hub, state)
        return StreamingResponse(events, media_type="text/event-stream")
    return JSONResponse(await unless_client_gone(receive, generate(service.engine, state)))


def build_app(service: InstanceService) -> Starlette:
    async def healthz(request: Request) -> Response:
        load = service.engine.load()
        body = {
            "state": service.state,
            "function": service.function,
            "instance_id": service.instance_id,
            "in_flight": load.in_flight + service.custom_in_flight,
            "tokens_in": load.tokens_in,
            "tokens_out": load.tokens_out,
            "cancelled": service.engine.cancelled,
        }
        return JSONResponse(body, status_code=200 if service.state == "ready" else 503)

    async def generate_route(request: Request) -> Response:
        _check_ready(service)
        return await _run_generate(service, await json_body(request), request.receive)

    async def invoke(request: Request) -> Response:
        _check_ready(service)
        body = await json_body(request)
        if service.custom is None:
            return await _run_generate(service, body, request.receive)
        return await _invoke_custom(service, service.custom, body, request.receive)

    async def embed_route(request: Request) -> Response:
        _check_ready(service)
        if service.handler != "embedding":
            raise InvalidInput(f"this is a {service.handler} function, not an embedding one")
        prompts = embedding_inputs(await json_body(request), service.tok)
        if any(len(p) >= service.engine.max_context for p in prompts):
            raise InvalidInput(f"input: longer than the model's {service.engine.max_context}"
                               " tokens")  # fmt: skip
        service.custom_in_flight += 1  # counts as in flight while it runs (drain waits)
        try:
            vectors = await asyncio.to_thread(service.engine.embed, prompts)
        finally:
            service.custom_in_flight -= 1
        tokens = sum(len(p) for p in prompts)
        data = [{"index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse(
            {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/generate", generate_route, methods=["POST"]),
            Route("/v1/embed", embed_route, methods=["POST"]),
            Route("/v1/invoke", invoke, methods=["POST"]),
            *migration_routes(service.hub),
        ],
        exception_handlers=HANDLERS,  # ClientGone included: a 499 nobody reads
    )


async def _invoke_custom(
    service: InstanceService, custom: CustomHandler, body: Any, receive: Receive
) -> Response:
    """When the client goes away, an ``async def`` handler is cancelled (with the generation it
    awaits); a plain one's generations are cancelled and it runs on its thread to its end."""
    service.custom_in_flight += 1
    streaming = False
    try:
        try:
            context = service.context.for_request()
            if custom.is_async:
                result = await unless_client_gone(receive, custom.function(body, context))
            else:
                call = run_in_threadpool(custom.function, body, context)
                result = await unless_client_gone(receive, call, context.cancel)
        except SllmError:  # ClientGone included
            raise
        except Exception as exc:
            raise SllmError(
                f"handler raised {type(exc).__name__}: {exc}", code="handler_error"
            ) from None
        if isinstance(result, AsyncIterator | Iterator) and not isinstance(result, dict | str):
            streaming = True
            return StreamingResponse(
                _custom_stream(service, result), media_type="text/event-stream"
            )
        try:
            return JSONResponse(result)
        except (TypeError, ValueError) as exc:
            raise SllmError(f"handler returned a value that is not JSON: {exc}") from None
    finally:
        if not streaming:
            service.custom_in_flight -= 1


async def _custom_stream(
    service: InstanceService, result: AsyncIterator[Any] | Iterator[Any]
) -> AsyncIterator[bytes]:
    items = result if isinstance(result, AsyncIterator) else iterate_in_threadpool(result)
    try:
        async for item in items:
            yield sse({"delta": item} if isinstance(item, str) else item)
        yield DONE
    except SllmError as exc:
        yield error_event(exc)
    except Exception as exc:
        yield sse({"error": {"code": "handler_error", "message": f"{type(exc).__name__}: {exc}"}})
    finally:
        service.custom_in_flight -= 1
