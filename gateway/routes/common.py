"""What every route module needs: the wired gateway, a size-limited body, the bearer token."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gateway.service import GatewayService
from sllm.errors import PayloadTooLarge, Unauthorized


def service(request: Request) -> GatewayService:
    gw: GatewayService = request.app.state.gateway
    return gw


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (the declared
    Content-Length is checked first, so an honest oversized upload is not read at all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def require_token(request: Request) -> None:
    expected = service(request).settings.token
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not expected or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("invalid bearer token")
