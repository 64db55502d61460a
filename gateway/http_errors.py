"""Errors mapped to HTTP in one place (STYLE.md 9): a JSON body with a stable ``code`` and a
message that says what to fix. Under ``/v1/`` the body has OpenAI's shape instead, so OpenAI
clients surface the message."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.openai_format import openai_error
from sllm.errors import Overloaded, SllmError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(path: str, status: int, code: str, message: str) -> JSONResponse:
    if path.startswith("/v1/"):
        body = openai_error(status, code, message)
    else:
        body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status)


async def sllm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SllmError)
    response = error_response(request.url.path, exc.status, exc.code, exc.message)
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    return error_response(request.url.path, exc.status_code, code, message)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        request.url.path,
        500,
        "internal",
        f"internal error ({type(exc).__name__}); see gateway logs",
    )


HANDLERS = {SllmError: sllm_error, HTTPException: http_error, Exception: unexpected_error}
