"""RequireSecret, the check in front of every instance route: 401 with a JSON body and a log
line (never the presented value) unless the request carries the instance's secret."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from sllm.instance_auth import RequireSecret, auth_header, new_secret


def guarded(secret: str) -> httpx.AsyncClient:
    async def ok(request: object) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])])
    transport = httpx.ASGITransport(app=RequireSecret(app, secret, "i-1"))
    return httpx.AsyncClient(transport=transport, base_url="http://instance")


async def test_only_the_secret_opens_the_instance(caplog: pytest.LogCaptureFixture) -> None:
    secret = new_secret()
    async with guarded(secret) as http:
        assert (await http.get("/healthz", headers=auth_header(secret))).status_code == 200
        caplog.set_level(logging.WARNING, logger="sllm.instance_auth")
        for headers in ({}, auth_header(new_secret()), {"authorization": secret}):
            r = await http.post("/v1/migration/requests", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
    refusals = [r.getMessage() for r in caplog.records if r.name == "sllm.instance_auth"]
    assert len(refusals) == 3 and all("/v1/migration/requests" in m for m in refusals)
    assert "no instance secret" in refusals[0] and "wrong instance secret" in refusals[1]


def test_no_secret_no_server() -> None:
    with pytest.raises(ValueError, match="needs a secret"):
        RequireSecret(Starlette(), "")
