"""What every route module needs: the wired gateway, a size-limited body, and the two checks
of who is calling: the admin token (``/system``) and, for private functions, an invocation
key (``gateway.keys``)."""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request

from gateway.keys import ApiKey
from gateway.service import GatewayService
from sllm.errors import Forbidden, PayloadTooLarge, Unauthorized
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)


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


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_admin(request: Request, token: str | None) -> bool:
    expected = service(request).settings.token
    return bool(token and expected) and hmac.compare_digest(str(token).encode(), expected.encode())


def require_token(request: Request) -> None:
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not is_admin(request, token):
        raise Unauthorized("invalid bearer token")


async def caller_key(request: Request) -> ApiKey | None:
    """The invocation key the request carries, if it is a valid one."""
    token = bearer(request)
    return await service(request).keys.verify(token) if token else None


async def require_key(request: Request, record: FunctionRecord) -> None:
    """The one check of invocation routes: a private function wants a key that may call it
    (or the admin token). 401 without a valid key, 403 with a key for other functions; each
    refusal is logged (never with the key)."""
    if record.spec.auth == "public":
        return
    name = record.spec.name
    token = bearer(request)
    if token is None:
        _refused(request, name, 401, "no key")
        raise Unauthorized(
            f"function {name!r} is private: send 'Authorization: Bearer <key>' "
            "(an admin creates keys with `sllm key create`)"
        )
    if is_admin(request, token):
        return
    key = await service(request).keys.verify(token)
    if key is None:
        _refused(request, name, 401, "unknown or revoked key")
        raise Unauthorized(f"function {name!r}: the key is not valid (unknown or revoked)")
    if not key.allows(name):
        _refused(request, name, 403, f"key {key.id}")
        raise Forbidden(f"key {key.id} ({key.name or 'unnamed'}) may not call function {name!r}")


def _refused(request: Request, function: str, status: int, why: str) -> None:
    client = request.client.host if request.client else "-"
    log.info("invocation refused function=%s status=%d reason=%s client=%s", function, status,
             why, client)  # fmt: skip
