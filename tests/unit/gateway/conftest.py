"""A gateway wired in-process: MemoryBus and MemoryKeyValue, a scripted node answering load and
unload commands on the bus, and scripted instances (a small Starlette app speaking the Instance
API) on a loopback uvicorn server (one per session, in a thread), so the gateway's own HTTP
client is exercised. The gateway app itself is driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app import Connection, create_app
from gateway.service import GatewayService
from sllm.bus import MemoryBus, MemoryKeyValue, Message
from sllm.messages import (
    CmdReply,
    DeviceState,
    InstanceEvent,
    InstanceState,
    LoadCmd,
    NodeHeartbeat,
    UnloadCmd,
    decode,
    encode,
    event_subject,
    heartbeat_subject,
    node_cmd_subject,
)
from sllm.settings import GatewaySettings
from sllm_cli.servers import free_port
from tests import secret_scan

TOKEN = "test-token"
secret_scan.register(TOKEN)
AUTH = {"authorization": f"Bearer {TOKEN}"}


def secret_of(instance_id: str) -> str:
    """The secret the scripted node gives each instance (the scripted instance checks it)."""
    return f"sllmi_test-{instance_id}"


def answer_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "echo: " + body["messages"][-1]["content"]
    return "echo: " + str(body.get("prompt", ""))


@dataclass
class ScriptedInstances:
    """Every instance is a path prefix ``/i/<id>`` of one app on a loopback uvicorn server;
    ``seen`` records (instance id, path, body); ``break_stream`` ids drop the connection after
    the first event of a stream."""

    seen: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    break_stream: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    not_serving: set[str] = field(default_factory=set)  # their /healthz answers 503

    def app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            iid = request.path_params["iid"]
            serving = iid not in self.not_serving
            state = "ready" if serving else "draining"
            return JSONResponse({"state": state}, status_code=200 if serving else 503)

        async def generate(request: Request) -> Response:
            iid = request.path_params["iid"]
            if request.headers.get("authorization") != f"Bearer {secret_of(iid)}":
                return JSONResponse({"error": {"code": "unauthorized", "message": "x"}}, 401)
            body = json.loads(await request.body())
            path = request.url.path.removeprefix(f"/i/{iid}")
            self.seen.append((iid, path, body))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            text = answer_text(body)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            if body.get("stream"):
                broken = iid in self.break_stream

                async def events() -> AsyncIterator[bytes]:
                    for word in text.split(" "):
                        yield f"data: {json.dumps({'delta': word + ' ', 'token_ids': [1]})}\n\n".encode()
                        if broken:
                            raise RuntimeError("scripted instance died mid-stream")
                    yield f"data: {json.dumps({'finish_reason': 'stop', 'usage': usage})}\n\n".encode()
                    yield b"data: [DONE]\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"id": "r1", "text": text, "finish_reason": "stop", "usage": usage})

        return Starlette(
            routes=[
                Route("/i/{iid}/v1/generate", generate, methods=["POST"]),
                Route("/i/{iid}/v1/invoke", generate, methods=["POST"]),
                Route("/i/{iid}/healthz", healthz, methods=["GET"]),
            ]
        )


class _Backend:
    """One loopback uvicorn server for the whole session, in a daemon thread with its own
    event loop (starting one per test would cost more than the test); each harness gives it
    fresh ``instances``."""

    def __init__(self) -> None:
        self.instances = ScriptedInstances()
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        if not self.base_url:
            port = free_port()
            app = _Dispatch(self)
            config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                    lifespan="off")  # fmt: skip
            server = self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=server.run, name="scripted-instances")
            self._thread.start()
            deadline = time.monotonic() + 10
            while not server.started:
                assert time.monotonic() < deadline, "scripted instance server did not start"
                time.sleep(0.005)
            self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server, self._thread, self.base_url = None, None, ""


class _Dispatch:
    """ASGI app forwarding to the current ScriptedInstances' app."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._apps: dict[int, Starlette] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        instances = self._backend.instances
        app = self._apps.get(id(instances))
        if app is None:
            self._apps = {id(instances): instances.app()}
            app = self._apps[id(instances)]
        await app(scope, receive, send)


BACKEND = _Backend()


@pytest.fixture(scope="session", autouse=True)
def _stop_scripted_instances() -> Iterator[None]:
    yield
    BACKEND.stop()


@dataclass
class ScriptedNode:
    """Answers load/unload on the bus like a node; instances are ready after ``load_s``."""

    bus: MemoryBus
    base_url: str = ""
    node_id: str = "node-a"
    slots: int = 2
    load_s: float = 0.05
    refuse: bool = False
    refuse_code: str = "busy"
    fail_ready: str = ""
    loads: list[LoadCmd] = field(default_factory=list)
    unloads: list[UnloadCmd] = field(default_factory=list)
    instances: dict[str, InstanceState] = field(default_factory=dict)
    seq: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        await self.bus.subscribe(node_cmd_subject(self.node_id), self._on_cmd)
        await self.heartbeat()

    async def heartbeat(self) -> None:
        self.seq += 1
        used = {s.device: s.instance_id for s in self.instances.values()}
        devices = [
            DeviceState(f"cpu{i}", "cpu", 2**30, used.get(f"cpu{i}")) for i in range(self.slots)
        ]
        hb = NodeHeartbeat(self.node_id, self.seq, devices, list(self.instances.values()), {}, {})
        await self.bus.publish(heartbeat_subject(self.node_id), encode(hb))

    async def _on_cmd(self, msg: Message) -> bytes:
        cmd = decode(msg.data)
        if isinstance(cmd, LoadCmd):
            self.loads.append(cmd)
            if self.refuse:
                return encode(
                    CmdReply(ok=False, code=self.refuse_code, message="refused by script")
                )
            holders = {s.device: s.instance_id for s in self.instances.values()}
            if holders.get(cmd.device, cmd.instance_id) != cmd.instance_id:
                message = f"device {cmd.device} is in use by instance {holders[cmd.device]}"
                return encode(CmdReply(ok=False, code="conflict", message=message))
            self.instances[cmd.instance_id] = InstanceState(
                cmd.instance_id, cmd.function, cmd.device, "starting", None, 0,
                revision=int(cmd.record["revision"]),
            )  # fmt: skip
            task = asyncio.create_task(self._ready(cmd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(cmd, UnloadCmd):
            self.unloads.append(cmd)
            state = self.instances.pop(cmd.instance_id, None)
            if state is not None:
                await self.bus.publish(
                    event_subject(self.node_id),
                    encode(InstanceEvent("stopped", cmd.instance_id, self.node_id, state.function)),
                )
        return encode(CmdReply(ok=True))

    async def _ready(self, cmd: LoadCmd) -> None:
        await asyncio.sleep(self.load_s)
        if self.fail_ready:
            self.instances.pop(cmd.instance_id, None)
            event = InstanceEvent("failed", cmd.instance_id, self.node_id, cmd.function,
                                  error=self.fail_ready)  # fmt: skip
        else:
            address = f"{self.base_url}/i/{cmd.instance_id}"
            state = self.instances[cmd.instance_id]
            secret = secret_of(cmd.instance_id)
            self.instances[cmd.instance_id] = replace(
                state, state="ready", address=address, secret=secret
            )
            event = InstanceEvent("ready", cmd.instance_id, self.node_id, cmd.function, address,
                                  tier="dram", load_s=self.load_s,
                                  revision=int(cmd.record["revision"]), secret=secret)  # fmt: skip
        await self.bus.publish(event_subject(self.node_id), encode(event))


def settings(**overrides: Any) -> GatewaySettings:
    env = {"SLLM_TOKEN": TOKEN, "SLLM_WAKE_TIMEOUT": "5s", "SLLM_QUEUE_SIZE": "32",
           "SLLM_MAX_BODY_BYTES": "64Ki", "SLLM_POLICY": "least-loaded",
           "SLLM_STORE_URL": "/tmp/store", "SLLM_SCALE_DOWN_WINDOW": "1s"}  # fmt: skip
    return replace(GatewaySettings.from_env(env), **overrides)


@dataclass
class Harness:
    client: httpx.AsyncClient
    gateway: GatewayService
    node: ScriptedNode
    instances: ScriptedInstances
    bus: MemoryBus
    kv: MemoryKeyValue

    async def deploy(
        self, name: str = "chat", auth: str = "public", **scale: Any
    ) -> httpx.Response:
        spec = {"name": name, "model": "tiny", "handler": "chat", "auth": auth,
                "scale": {"min": 0, "max": 2, "target_concurrency": 4, "keep_alive": "60s", **scale}}  # fmt: skip
        body = {"spec": spec, "checkpoint": f"checkpoints/{name}/abc", "checkpoint_bytes": 1000}
        return await self.client.post("/system/functions", json=body, headers=AUTH)


@asynccontextmanager
async def harness(**overrides: Any) -> AsyncIterator[Harness]:
    bus, kv = MemoryBus(), MemoryKeyValue()
    instances = ScriptedInstances()
    BACKEND.instances = instances
    node = ScriptedNode(bus, BACKEND.start())

    async def connect(_: GatewaySettings) -> Connection:
        return Connection(bus, kv)

    app = create_app(settings(**overrides), connect=connect, tick_s=0.02, settle_s=0)
    async with app.router.lifespan_context(app):
        await node.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Harness(client, app.state.gateway, node, instances, bus, kv)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with harness() as built:
        yield built
