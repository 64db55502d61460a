"""``POST /system/migrate`` (bearer token): live-migrate an instance's in-flight streams to
another node, for operators.

Body: ``{"instance": <id>, "target_node": <node>}`` or ``{"function": <name>, "target_node":
<node>}`` (then its busiest ready instance elsewhere than the target). Answers 200 with the
outcome once the switch is done: moved/finished requests, rounds, tokens, seconds.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.migration.orchestrator import Migrator
from gateway.routes.common import read_body, require_token, service
from gateway.service import GatewayService
from gateway.validation import parse_json
from sllm.errors import Conflict, InvalidInput


def migrator_of(gw: GatewayService) -> Migrator:
    """The gateway's Migrator (one per gateway, shared with the controller, which applies the
    scheduler's migration decisions with it)."""
    return gw.migrator


def _source(gw: GatewayService, body: dict[str, object], target_node: str) -> str:
    instance, function = body.get("instance"), body.get("function")
    if (instance is None) == (function is None):
        raise InvalidInput("body: give exactly one of 'instance' (an id) or 'function' (a name)")
    if instance is not None:
        if not isinstance(instance, str) or not instance:
            raise InvalidInput(f"instance: expected an instance id, got {instance!r}")
        return instance
    if not isinstance(function, str) or not function:
        raise InvalidInput(f"function: expected a function name, got {function!r}")
    gw.registry.get(function)
    ready = [
        i
        for i in gw.table.of(function)
        if i.state == "ready" and i.node != target_node and i.address
    ]
    if not ready:
        raise Conflict(f"function {function!r} has no ready instance outside {target_node}")
    return max(ready, key=lambda i: (i.in_flight, -i.since)).instance_id


async def migrate(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    body = parse_json(await read_body(request, gw.settings.max_body_bytes))
    if not isinstance(body, dict):
        raise InvalidInput("body: expected {'instance' or 'function', 'target_node'}")
    unknown = set(body) - {"instance", "function", "target_node"}
    if unknown:
        raise InvalidInput(f"{sorted(unknown)[0]}: unknown key (allowed: function, instance, "
                           "target_node)")  # fmt: skip
    target = body.get("target_node")
    if not isinstance(target, str) or not target:
        raise InvalidInput(f"target_node: expected a node id, got {target!r}")
    outcome = await migrator_of(gw).migrate(_source(gw, body, target), target)
    return JSONResponse(outcome)


routes = [Route("/system/migrate", migrate, methods=["POST"])]
