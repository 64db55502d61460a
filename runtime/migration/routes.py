"""The instance's migration endpoints (the node's migrate command drives them over HTTP).

- ``GET /v1/migration/requests`` (source): exported states of the streamed in-flight requests.
- ``POST /v1/migration/import`` ``{"states": [...]}`` (target): recompute their KV caches ->
  ``{"staged": {request_id: tokens covered}}``.
- ``POST /v1/migration/handoff`` ``{"request_ids", "target_instance_id", "target_address",
  "timeout_s"}`` (source): stop them here; their streams end with a ``migrated`` event ->
  ``{"moved": [final states], "finished": [ids not moved]}``.
- ``POST /v1/migration/abort`` ``{"request_ids": [...]}`` (target): drop staged caches.
- ``POST /v1/migration/resume`` ``{"state": <final state>}`` (target): continue a moved request
  from its staged cache; answers the same event stream as ``/v1/generate`` (and may itself be
  moved again).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.engine.request import RequestState
from runtime.instance.http import json_object
from runtime.instance.stream import started
from runtime.migration.handoff import MigrationHub, Target
from sllm.errors import InvalidInput

# 10 s: a cancel lands between two decoding steps; a step taking longer means a sick instance.
DEFAULT_HANDOFF_TIMEOUT_S = 10.0


def _ids(body: dict[str, Any]) -> list[str]:
    ids = body.get("request_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidInput("request_ids: expected a list of request ids")
    return ids


def migration_routes(hub: MigrationHub) -> list[Route]:

    async def requests(request: Request) -> Response:
        return JSONResponse({"requests": hub.migratable()})

    async def import_states(request: Request) -> Response:
        states = (await json_object(request)).get("states")
        if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
            raise InvalidInput("states: expected a list of exported request states")
        staged = await asyncio.to_thread(hub.stager.stage, states)
        return JSONResponse({"staged": staged})

    async def handoff(request: Request) -> Response:
        body = await json_object(request)
        ids = _ids(body)
        target_id, address = body.get("target_instance_id"), body.get("target_address")
        if not isinstance(target_id, str) or not isinstance(address, str) or not address:
            raise InvalidInput("target_instance_id, target_address: expected strings")
        timeout = body.get("timeout_s", DEFAULT_HANDOFF_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidInput(f"timeout_s: expected a positive number, got {timeout!r}")
        moved, finished = await hub.handoff(ids, Target(target_id, address), float(timeout))
        return JSONResponse({"moved": moved, "finished": finished})

    async def abort(request: Request) -> Response:
        ids = _ids(await json_object(request))
        return JSONResponse({"dropped": await asyncio.to_thread(hub.stager.drop, ids)})

    async def resume(request: Request) -> Response:
        raw = (await json_object(request)).get("state")
        if not isinstance(raw, dict):
            raise InvalidInput("state: expected an exported request state")
        events = await started(hub, RequestState.from_export(raw))
        return StreamingResponse(events, media_type="text/event-stream")

    return [
        Route("/v1/migration/resume", resume, methods=["POST"]),
        Route("/v1/migration/requests", requests, methods=["GET"]),
        Route("/v1/migration/import", import_states, methods=["POST"]),
        Route("/v1/migration/handoff", handoff, methods=["POST"]),
        Route("/v1/migration/abort", abort, methods=["POST"]),
    ]
