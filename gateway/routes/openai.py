"""OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions`` (``model`` is the
function name) and ``/v1/models``. Requests are validated and turned into the Instance API's
generate body (``gateway.openai_request``: one per choice); answers (streamed or not) are
translated into OpenAI's shapes, with usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.openai_format import (
    OpenAIStream,
    SseParser,
    embeddings_response,
    native_event,
    openai_response,
    total_usage,
)
from gateway.openai_request import parse_chat, parse_completion, parse_embeddings
from gateway.proxy import Upstream, error_from_upstream
from gateway.routes.common import bearer, caller_key, is_admin, read_body, require_key, service
from gateway.routes.invoke import SSE_HEADERS, count
from gateway.service import GatewayService
from gateway.validation import openai_model, parse_json
from sllm.errors import InvalidInput, NotFound, ProtocolError, SllmError
from sllm.spec import FunctionRecord


async def _function(gw: GatewayService, request: Request, model: str) -> FunctionRecord:
    """The function a request names as its model, if the caller may invoke it."""
    record = gw.registry.find(model)
    if record is None:
        raise NotFound(f"model {model!r} does not exist (GET /v1/models lists the functions)",
                       code="model_not_found")  # fmt: skip
    await require_key(request, record)
    return record


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    gw = service(request)
    started = gw.clock.now()
    api = "chat" if chat else "completions"
    model = ""
    upstreams: list[Upstream] = []
    try:
        data, model = openai_model(parse_json(await read_body(request, gw.settings.max_body_bytes)))
        record = await _function(gw, request, model)
        if record.spec.handler == "embedding":
            raise InvalidInput(f"model: {model!r} is an embedding function: use /v1/embeddings")
        req = (parse_chat if chat else parse_completion)(data, record.spec.generation)
        for body in req.choice_bodies():  # n choices: n requests, each movable on its own
            upstream = await gw.proxy.open(
                record, "/v1/generate", json.dumps(body).encode(), started, request.receive
            )
            upstreams.append(upstream)
            if upstream.status >= 400:
                raise error_from_upstream(upstream.status, await gw.proxy.read_all(upstream))
        if req.stream and all(u.is_stream for u in upstreams):
            count(gw, model, api, 200)
            streams = [
                OpenAIStream(model, chat, req.include_usage, i, req.logprobs, req.tool_call,
                             req.echo)
                for i in range(req.n)
            ]  # fmt: skip
            for s in streams[1:]:  # one completion: one id and time across its choices
                s.id, s.created = streams[0].id, streams[0].created
            merged = _merge(gw, list(zip(upstreams, streams, strict=True)), req.include_usage)
            upstreams = []  # the stream owns them now
            return StreamingResponse(merged, media_type="text/event-stream", headers=SSE_HEADERS)
        answers = [await _answer(gw, u, request) for u in upstreams]
        upstreams = []
        body = openai_response(answers, model, chat, tool_call=req.tool_call, echo=req.echo)
    except SllmError as exc:
        count(gw, model or "-", api, exc.status)
        raise
    finally:
        for upstream in upstreams:  # opened, not handed on: an error before the answer
            await gw.proxy.finish(upstream)
    count(gw, model, api, 200)
    return JSONResponse(body)


async def _answer(gw: GatewayService, upstream: Upstream, request: Request) -> dict[str, Any]:
    raw = await gw.proxy.read_all(upstream, request.receive)
    try:
        answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("instance sent an answer that is not JSON", status=502) from None
    if not isinstance(answer, dict):
        raise ProtocolError("instance sent an answer that is not an object", status=502)
    return answer


async def _merge(
    gw: GatewayService, choices: list[tuple[Upstream, OpenAIStream]], include_usage: bool
) -> AsyncIterator[bytes]:
    """The OpenAI SSE of all choices, each chunk as it comes; one usage chunk (all choices)
    and one ``[DONE]`` at the end."""
    if len(choices) == 1:
        upstream, stream = choices[0]
        async for out in _translate(gw, upstream, stream):
            yield out
    else:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def pump(upstream: Upstream, stream: OpenAIStream) -> None:
            try:
                async for line in _translate(gw, upstream, stream):
                    await queue.put(line)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(u, s)) for u, s in choices]
        try:
            running = len(tasks)
            while running:
                line = await queue.get()
                if line is None:
                    running -= 1
                else:
                    yield line
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    streams = [s for _, s in choices]
    if include_usage:
        usages = [s.usage for s in streams if s.usage is not None]
        yield streams[0].usage_chunk(total_usage(usages))
    yield streams[0].done()


async def _translate(
    gw: GatewayService, upstream: Upstream, stream: OpenAIStream
) -> AsyncIterator[bytes]:
    """One choice's native stream (spliced across live migrations) as OpenAI chunks."""
    parser = SseParser()
    async for chunk in gw.proxy.passthrough(upstream):
        for payload in parser.feed(chunk):
            try:
                event = native_event(payload)
            except ProtocolError as exc:
                event = {"error": {"code": exc.code, "message": exc.message}}
            if event is None:
                continue
            for line in stream.translate(event):
                yield line


async def embeddings(request: Request) -> Response:
    gw = service(request)
    started = gw.clock.now()
    model = ""
    try:
        data, model = openai_model(parse_json(await read_body(request, gw.settings.max_body_bytes)))
        record = await _function(gw, request, model)
        if record.spec.handler != "embedding":
            raise InvalidInput(
                f"model: {model!r} is a {record.spec.handler} function, not an embedding one "
                "(handler: embedding)"
            )
        native, encoding = parse_embeddings(data)
        upstream = await gw.proxy.open(
            record, "/v1/embed", json.dumps(native).encode(), started, request.receive
        )
        if upstream.status >= 400:
            raise error_from_upstream(upstream.status, await gw.proxy.read_all(upstream))
        body = embeddings_response(await _answer(gw, upstream, request), model, encoding)
    except SllmError as exc:
        count(gw, model or "-", "embeddings", exc.status)
        raise
    count(gw, model, "embeddings", 200)
    return JSONResponse(body)


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
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
