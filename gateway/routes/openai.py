"""OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions`` (``model`` is the
function name) and ``/v1/models``. Requests are validated and turned into the Instance API's
generate body; answers (streamed or not) are translated into OpenAI's shapes, with usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.openai_format import OpenAIStream, SseParser, native_event, openai_response
from gateway.proxy import Upstream, error_from_upstream
from gateway.routes.common import bearer, caller_key, is_admin, read_body, require_key, service
from gateway.routes.invoke import SSE_HEADERS, count
from gateway.service import GatewayService
from gateway.validation import (
    include_usage,
    openai_chat,
    openai_completion,
    openai_model,
    parse_json,
)
from sllm.errors import NotFound, ProtocolError, SllmError


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    gw = service(request)
    started = gw.clock.now()
    api = "chat" if chat else "completions"
    model = ""
    try:
        data, model = openai_model(parse_json(await read_body(request, gw.settings.max_body_bytes)))
        record = gw.registry.find(model)
        if record is None:
            raise NotFound(f"model {model!r} does not exist (GET /v1/models lists the functions)",
                           code="model_not_found")  # fmt: skip
        await require_key(request, record)
        native = (openai_chat if chat else openai_completion)(data, record.spec.generation)
        usage = include_usage(data)
        upstream = await gw.proxy.open(
            record, "/v1/generate", json.dumps(native).encode(), started, request.receive
        )
        if upstream.status >= 400:
            raise error_from_upstream(upstream.status, await gw.proxy.read_all(upstream))
        if native["stream"] and upstream.is_stream:
            count(gw, model, api, 200)
            stream = OpenAIStream(model=model, chat=chat, include_usage=usage)
            return StreamingResponse(
                _translate(gw, upstream, stream),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        raw = await gw.proxy.read_all(upstream, request.receive)
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProtocolError("instance sent an answer that is not JSON", status=502) from None
        if not isinstance(answer, dict):
            raise ProtocolError("instance sent an answer that is not an object", status=502)
        body = openai_response(answer, model, chat)
    except SllmError as exc:
        count(gw, model or "-", api, exc.status)
        raise
    count(gw, model, api, 200)
    return JSONResponse(body)


async def _translate(
    gw: GatewayService, upstream: Upstream, stream: OpenAIStream
) -> AsyncIterator[bytes]:
    parser = SseParser()
    async for chunk in gw.proxy.passthrough(upstream):
        for payload in parser.feed(chunk):
            try:
                event = native_event(payload)
            except ProtocolError as exc:
                event = {"error": {"code": exc.code, "message": exc.message}}
            if event is None:
                yield stream.done()
                continue
            for line in stream.translate(event):
                yield line


async def models(request: Request) -> Response:
    """The functions the caller may invoke: public ones, plus the private ones its key (or
    the admin token) allows."""
    gw = service(request)
    admin = is_admin(request, bearer(request))
    key = None if admin else await caller_key(request)
    data = [
        {"id": r.spec.name, "object": "model", "created": 0, "owned_by": "sllm"}
        for r in gw.registry.all()
        if r.spec.auth == "public" or admin or (key is not None and key.allows(r.spec.name))
    ]
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
