"""Operations: ``/healthz`` (liveness plus a summary) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.metrics import CONTENT_TYPE
from gateway.routes.common import service


async def healthz(request: Request) -> Response:
    gw = service(request)
    return JSONResponse(
        {
            "status": "ok",
            "functions": len(gw.registry.all()),
            "nodes": len(gw.table.live_nodes(gw.clock.now())),
            # among several gateways: this one's name, whether it decides, who leads
            "gateway": gw.peers.me,
            "deciding": gw.peers.deciding(),
            "leader": gw.peers.leadership.holder,
        }
    )


async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.render(), media_type=CONTENT_TYPE)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
