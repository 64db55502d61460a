"""The data plane's one secret per instance: how it is made, sent and checked.

The node makes a secret for each instance it starts and hands it over on the instance's stdin
(never in its arguments or environment, which other local users can read). The gateway learns it
from the ``ready`` event and the node's heartbeats (subjects only gateways may read), and sends
it on every call to the instance as ``Authorization: Bearer <secret>``. ``RequireSecret``, in
front of the whole instance app, answers anything else 401 with a JSON body and logs it.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

# A recognisable prefix: a leaked secret can be found in logs by pattern (tests grep for it).
PREFIX = "sllmi_"


def new_secret() -> str:
    """256 random bits, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def auth_header(secret: str) -> dict[str, str]:
    """The header that carries ``secret`` on a call to an instance."""
    return {"authorization": f"Bearer {secret}"}


class RequireSecret:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <secret>``."""

    def __init__(self, app: ASGIApp, secret: str, instance_id: str = "") -> None:
        if not secret:
            raise ValueError("an instance needs a secret to serve (the node sends one)")
        self._app = app
        self._expected = f"Bearer {secret}".encode()
        self._instance_id = instance_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = value
                break
        if hmac.compare_digest(presented, self._expected):
            await self._app(scope, receive, send)
            return
        client = scope.get("client") or ("-", 0)
        log.warning(
            "refused %s %s from %s:%s: %s instance secret (instance %s)",
            scope.get("method"), scope.get("path"), client[0], client[1],
            "wrong" if presented else "no", self._instance_id or "-",
        )  # fmt: skip
        body = json.dumps(
            {
                "error": {
                    "code": "unauthorized",
                    "message": "this instance answers only its gateway and node: "
                    "send 'Authorization: Bearer <instance secret>'",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
