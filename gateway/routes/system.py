"""The admin API under ``/system`` (bearer token): functions (deploy, update, describe,
delete), manual scaling, nodes, logs and gateway info. Shapes follow the shared contract."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.routes.common import read_body, require_token, service
from gateway.validation import parse_json
from sllm import __version__
from sllm.errors import InvalidInput, ValidationFailed
from sllm.spec import FunctionRecord, FunctionSpec, checkpoint_key_problem, parse_spec_dict

# Keys only the internal spec form has (bytes and seconds instead of "2Gi" and "60s").
_INTERNAL_KEYS = {("resources", "memory_bytes"), ("scale", "keep_alive_s")}


def record_from_body(data: object) -> FunctionRecord:
    """A deploy/update body -> a validated record (422 naming the field otherwise)."""
    if not isinstance(data, dict):
        raise ValidationFailed("body: expected an object with spec, checkpoint, checkpoint_bytes")
    for key in data:
        if key not in ("spec", "checkpoint", "checkpoint_bytes", "handler_source", "requirements"):
            raise ValidationFailed(
                f"{key}: unknown key (allowed: checkpoint, checkpoint_bytes, handler_source, "
                "requirements, spec)"
            )
    spec_data = data.get("spec")
    if not isinstance(spec_data, dict):
        raise ValidationFailed("spec: expected the function spec as an object")
    internal = any(
        isinstance(spec_data.get(section), dict) and key in spec_data[section]
        for section, key in _INTERNAL_KEYS
    )
    try:
        spec = FunctionSpec.from_dict(spec_data) if internal else parse_spec_dict(spec_data)
    except ValidationFailed as exc:
        raise ValidationFailed(f"spec.{exc.message}") from None
    checkpoint = data.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise ValidationFailed("checkpoint: expected the checkpoint's key in the store")
    problem = checkpoint_key_problem(checkpoint.strip())
    if problem is not None:
        raise ValidationFailed(f"checkpoint: {checkpoint!r} {problem}")
    size = data.get("checkpoint_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValidationFailed(f"checkpoint_bytes: expected an integer >= 0, got {size!r}")
    sources = data.get("handler_source") or {}
    if not isinstance(sources, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sources.items()
    ):
        raise ValidationFailed("handler_source: expected an object of file name -> text")
    for filename in sources:
        if filename.startswith("/") or ".." in filename.split("/") or not filename:
            raise ValidationFailed(f"handler_source.{filename}: must be a relative path")
    requirements = data.get("requirements") or ""
    if not isinstance(requirements, str):
        raise ValidationFailed("requirements: expected the text of requirements.txt")
    return FunctionRecord(
        spec, checkpoint.strip(), size, handler_source=dict(sources), requirements=requirements
    )


def summary(request: Request, record: FunctionRecord) -> dict[str, Any]:
    return {
        "name": record.spec.name,
        "spec": record.spec.to_dict(),
        "checkpoint": record.checkpoint,
        "checkpoint_bytes": record.checkpoint_bytes,
        "revision": record.revision,
        "replicas": service(request).controller.replicas(record.spec.name),
    }


async def info(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    return JSONResponse(
        {
            "version": __version__,
            "store_url": gw.settings.store.url,
            "nodes": len(gw.table.live_nodes(gw.clock.now())),
            "policy": gw.settings.policy,
        }
    )


async def list_functions(request: Request) -> Response:
    require_token(request)
    return JSONResponse([summary(request, r) for r in service(request).registry.all()])


async def deploy(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    record = record_from_body(parse_json(await read_body(request, gw.settings.max_body_bytes)))
    created = await gw.registry.create(record)
    await gw.commands.announce(created, sorted(gw.table.nodes))
    return JSONResponse(summary(request, created), status_code=201)


async def update(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    name = request.path_params["name"]
    record = record_from_body(parse_json(await read_body(request, gw.settings.max_body_bytes)))
    updated = await gw.registry.update(name, record)
    await gw.commands.announce(updated, sorted(gw.table.nodes))
    return JSONResponse(summary(request, updated))


async def describe(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    record = gw.registry.get(request.path_params["name"])
    body = summary(request, record)
    body["handler_source"] = sorted(record.handler_source)
    body["instances"] = [i.summary() for i in gw.table.of(record.spec.name)]
    cache = []
    for hb in gw.table.live_nodes(gw.clock.now()):
        tiers = [
            tier
            for tier, entries in hb.cache.items()
            if any(e.checkpoint == record.checkpoint for e in entries)
        ]
        if tiers:
            cache.append({"node": hb.node_id, "tiers": tiers})
    body["cache"] = cache
    return JSONResponse(body)


async def remove(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    # the registry tells the service, which fails the queued requests and drains instances
    await gw.registry.delete(request.path_params["name"])
    return Response(status_code=204)


async def scale(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    name = request.path_params["name"]
    record = gw.registry.get(name)
    data = parse_json(await read_body(request, gw.settings.max_body_bytes))
    replicas = data.get("replicas") if isinstance(data, dict) else None
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise InvalidInput(f"replicas: expected an integer, got {replicas!r}")
    if not 0 <= replicas <= record.spec.scale.max:
        raise InvalidInput(
            f"replicas: must be between 0 and scale.max ({record.spec.scale.max}), got {replicas}"
        )
    await gw.peers.scale(name, replicas)  # applied here, or by the gateway that decides
    return JSONResponse({"function": name, "replicas": replicas}, status_code=202)


async def nodes(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    now = gw.clock.now()
    out = []
    for node_id in sorted(gw.table.nodes):
        seen = gw.table.nodes[node_id]
        entry = dataclasses.asdict(seen.heartbeat)
        for inst in entry["instances"]:
            inst.pop("secret", None)  # the data plane's secrets stay in the gateway
        entry["age_s"] = round(now - seen.seen, 3)
        entry["live"] = seen.heartbeat in gw.table.live_nodes(now)
        out.append(entry)
    return JSONResponse(out)


async def logs(request: Request) -> Response:
    require_token(request)
    gw = service(request)
    name = request.path_params["name"]
    gw.registry.get(name)
    raw = request.query_params.get("tail", "100")
    if not raw.isdigit():
        raise InvalidInput(f"tail: expected a non-negative integer, got {raw!r}")
    return JSONResponse(gw.logs.tail(name, int(raw)))


routes = [
    Route("/system/info", info, methods=["GET"]),
    Route("/system/functions", list_functions, methods=["GET"]),
    Route("/system/functions", deploy, methods=["POST"]),
    Route("/system/functions/{name}", describe, methods=["GET"]),
    Route("/system/functions/{name}", update, methods=["PUT"]),
    Route("/system/functions/{name}", remove, methods=["DELETE"]),
    Route("/system/scale/{name}", scale, methods=["POST"]),
    Route("/system/nodes", nodes, methods=["GET"]),
    Route("/system/logs/{name}", logs, methods=["GET"]),
]
