"""The Instance HTTP API's wire helpers, shared by its route modules (``server``,
``runtime.migration.routes``): errors mapped to ``{"error": {"code", "message"}}`` with the
error's status in one place (a Starlette exception handler), the JSON body reader and the
server-sent event writer."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sllm.errors import InvalidInput, SllmError

DONE = b"data: [DONE]\n\n"


async def sllm_error(request: Request, exc: Exception) -> Response:
    """An ``SllmError`` raised by a route as its JSON body and status (``ClientGone``: a 499
    nobody reads)."""
    assert isinstance(exc, SllmError)
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status
    )


HANDLERS = {SllmError: sllm_error}


async def json_body(request: Request) -> Any:
    """The request's body parsed as JSON; ``InvalidInput`` saying why if it is not."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidInput("body: not valid JSON (nested too deeply)") from None


async def json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object; ``InvalidInput`` if it is anything else."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object")
    return body


def sse(payload: object) -> bytes:
    """One server-sent event whose data is ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def error_event(exc: SllmError) -> bytes:
    """The event that ends a stream failing after it started."""
    return sse({"error": {"code": exc.code, "message": exc.message}})
