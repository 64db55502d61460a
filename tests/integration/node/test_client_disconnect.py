"""A client that disconnects while its non-streaming (JSON) request is generating cancels the
generation: the instance served by a real uvicorn, the tiny model, a raw socket as the client.

The generations are long on purpose (30,000 tokens, minutes on this machine), so a request that
is not cancelled cannot end by itself within the tests' deadlines."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from runtime.engine.sampling import SamplingDefaults
from runtime.instance.handlers import CustomHandler, HandlerContext
from runtime.instance.server import InstanceService, build_app

LONG = 30_000
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[tuple[TransformersBackend, Tokenizing]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    # rotary positions extend past the config's 512, so a request can be made long enough
    eng = TransformersBackend(
        model, tok.decode, eos_ids=[tokenizer.eos_token_id], max_context=LONG + 512
    )
    eng.start()
    yield eng, tok
    eng.stop()


def long_body(**extra: Any) -> dict[str, Any]:
    return {"prompt": "hello", "max_tokens": LONG, "ignore_eos": True, **extra}


def sync_handler(request: dict[str, Any], ctx: Any) -> Any:
    """Shaped like templates/python-handler: a blocking ``ctx.generate`` on a worker thread."""
    result = ctx.generate(**long_body())
    return {"answer": result["text"], "usage": result["usage"]}


async def async_handler(request: dict[str, Any], ctx: Any) -> Any:
    result = await ctx.agenerate(**long_body())
    return {"answer": result["text"]}


class Served:
    """``build_app(service)`` under uvicorn on its own thread and event loop."""

    def __init__(self, service: InstanceService) -> None:
        import uvicorn

        self.service = service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(build_app(service), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]})
        self._thread.start()
        deadline = time.monotonic() + DEADLINE_S
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=DEADLINE_S)
        self._sock.close()


@pytest.fixture(params=["builtin", "sync-handler", "async-handler"])
def served(
    request: pytest.FixtureRequest, engine: tuple[TransformersBackend, Tokenizing]
) -> Iterator[Served]:
    eng, tok = engine
    defaults = SamplingDefaults(max_tokens=8, temperature=0.0)
    custom = {
        "builtin": None,
        "sync-handler": CustomHandler(sync_handler, is_async=False),
        "async-handler": CustomHandler(async_handler, is_async=True),
    }[request.param]
    service = InstanceService(
        function="tiny",
        instance_id="i-disconnect",
        handler="chat" if custom is None else "handler:handle",
        engine=eng,
        tok=tok,
        defaults=defaults,
        context=HandlerContext(eng, tok, defaults, {}),
        custom=custom,
        state="ready",
    )
    s = Served(service)
    yield s
    s.stop()


async def health(http: httpx.AsyncClient, port: int) -> dict[str, Any]:
    reply = await http.get(f"http://127.0.0.1:{port}/healthz")
    data: dict[str, Any] = reply.json()
    return data


async def wait_for(
    http: httpx.AsyncClient, port: int, ok: Any, what: str, timeout_s: float = DEADLINE_S
) -> dict[str, Any]:
    """Poll /healthz until ``ok(body)``; bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = await health(http, port)
        if ok(body):
            return body
        assert time.monotonic() < deadline, f"{what}: /healthz still says {body}"
        await asyncio.sleep(0.05)


async def test_json_request_is_cancelled_when_its_client_disconnects(served: Served) -> None:
    port = served.port
    path = "/v1/generate" if served.service.custom is None else "/v1/invoke"
    async with httpx.AsyncClient(timeout=30) as http:
        before = (await health(http, port))["cancelled"]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps(long_body()).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        # generating: in flight, tokens coming out
        await wait_for(
            http, port, lambda b: b["in_flight"] >= 1 and b["tokens_out"] > 0, "never started"
        )
        writer.close()
        await writer.wait_closed()
        after = await wait_for(
            http, port, lambda b: b["in_flight"] == 0, "still generating after the disconnect"
        )
        assert after["cancelled"] == before + 1
        assert served.service.custom_in_flight == 0
        # the instance still answers the next request
        done = await http.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "hi"})
        assert done.status_code == 200 and done.json()["finish_reason"] in ("stop", "length")
