"""``/system/keys`` (bearer token): invocation keys for private functions.

- ``POST /system/keys`` ``{"name": "ci", "functions": ["chat"]}`` (both optional; no
  functions: every function) -> 201 ``{id, name, functions, created, key}``. The key is shown
  this once; only its hash is kept.
- ``GET /system/keys`` -> ``[{id, name, functions, created}]``.
- ``DELETE /system/keys/<id>`` -> 204 (404 for an unknown id).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.keys import validate_request
from gateway.routes.common import read_body, require_token, service
from gateway.validation import parse_json


async def create(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    raw = await read_body(request, gw.settings.max_body_bytes)
    name, functions = validate_request(parse_json(raw) if raw.strip() else {})
    key, token = await gw.keys.create(name, functions)
    return JSONResponse({**key.summary(), "key": token}, status_code=201)


async def list_keys(request: Request) -> Response:
    require_token(request)
    return JSONResponse([k.summary() for k in await service(request).keys.all()])


async def revoke(request: Request) -> Response:
    require_token(request)
    await service(request).keys.revoke(request.path_params["key_id"])
    return Response(status_code=204)


routes = [
    Route("/system/keys", create, methods=["POST"]),
    Route("/system/keys", list_keys, methods=["GET"]),
    Route("/system/keys/{key_id}", revoke, methods=["DELETE"]),
]
