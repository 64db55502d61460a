"""``POST /function/<name>``: the function's own interface, forwarded to the instance's
``/v1/invoke``. Builtin handlers (chat, completion) take the Instance API's generate body,
validated here; a custom handler's JSON goes through as is (it must parse)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.proxy import error_from_upstream
from gateway.routes.common import read_body, require_key, service
from gateway.service import GatewayService
from gateway.validation import native_generate, parse_json
from sllm.errors import SllmError

BUILTIN_HANDLERS = ("chat", "completion")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def count(gw: GatewayService, function: str, api: str, status: int) -> None:
    gw.metrics.requests.labels(function, api, str(status)).inc()


async def invoke(request: Request) -> Response:
    gw = service(request)
    started = gw.clock.now()
    name = request.path_params["name"]
    try:
        record = gw.registry.get(name)
        await require_key(request, record)
        body = await read_body(request, gw.settings.max_body_bytes)
        data = parse_json(body)
        if record.spec.handler in BUILTIN_HANDLERS:
            body = json.dumps(native_generate(data, record.spec.generation)).encode()
        upstream = await gw.proxy.open(record, "/v1/invoke", body, started, request.receive)
        if upstream.status >= 500:
            raise error_from_upstream(upstream.status, await gw.proxy.read_all(upstream))
    except SllmError as exc:
        count(gw, name, "function", exc.status)
        raise
    count(gw, name, "function", upstream.status)
    if upstream.is_stream:
        return StreamingResponse(
            gw.proxy.passthrough(upstream),
            status_code=upstream.status,
            media_type=upstream.content_type,
            headers=SSE_HEADERS,
        )
    content = await gw.proxy.read_all(upstream, request.receive)
    return Response(content, status_code=upstream.status, media_type=upstream.content_type)


routes = [Route("/function/{name}", invoke, methods=["POST"])]
