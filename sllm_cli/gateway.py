"""`sllm gateway start`: run the gateway (HTTP API, registry, autoscaler) on uvicorn.

Settings come from the environment (sllm.settings.GatewaySettings); flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
from types import FrameType
from typing import Any

from sllm.errors import Unavailable, ValidationFailed
from sllm.settings import GatewaySettings, as_nats_urls
from sllm_cli.app import Groups, group


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    commands = group(root, groups, "gateway", "run the gateway (HTTP API and control plane)")
    start = commands.add_parser(
        "start",
        help="start the gateway in the foreground",
        description="Start the gateway: HTTP API, function registry (JetStream KV), autoscaler "
        "and router. Settings from SLLM_* environment variables; flags override them.",
    )
    start.add_argument("--host", help="bind address (SLLM_GATEWAY_HOST)")
    start.add_argument("--port", type=int, help="port (SLLM_GATEWAY_PORT)")
    start.add_argument("--nats-url", help="NATS server URLs, comma-separated (SLLM_NATS_URL)")
    start.add_argument("--nats-seed-file", help="NKey seed file (SLLM_NATS_SEED_FILE)")
    start.add_argument("--token", help="bearer token for /system (SLLM_TOKEN)")
    start.add_argument("--policy", help="placement policy (SLLM_POLICY)")
    start.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    start.set_defaults(func=start_gateway)


def _nats_urls(raw: str) -> tuple[str, ...]:
    try:
        return as_nats_urls(raw)
    except ValueError as exc:
        raise ValidationFailed(f"--nats-url {raw!r}: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    settings = GatewaySettings.from_env()
    overrides = {
        "host": args.host,
        "port": args.port,
        "nats_urls": None if args.nats_url is None else _nats_urls(args.nats_url),
        "nats_seed_file": args.nats_seed_file,
        "token": args.token,
        "policy": args.policy,
    }
    settings = dataclasses.replace(
        settings, **{k: v for k, v in overrides.items() if v is not None}
    )
    if not settings.token:
        raise ValidationFailed("SLLM_TOKEN is empty: set it or pass --token (it guards /system)")
    if not 1 <= settings.port <= 65535:
        raise ValidationFailed(f"--port: must be in [1, 65535], got {settings.port}")
    from sllm.settings import POLICIES

    if settings.policy not in POLICIES:
        raise ValidationFailed(f"--policy: {settings.policy!r} is not one of {', '.join(POLICIES)}")
    return settings


# seconds past the grace before uvicorn cancels what still runs after SIGTERM
STOP_BACKSTOP_S = 5


def start_gateway(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    settings = settings_from_args(args)
    logging.getLogger().setLevel(logging.INFO)
    # httpx logs every request at INFO: a line per request costs more than the gateway hop.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_serve(settings, args.log_level))
    return 0


# seconds a stopping gateway keeps serving the connections it has, each answer closing its
# connection, before uvicorn closes the idle ones
STOP_DRAIN_S = 1.0


class _Draining:
    """ASGI wrapper: once ``on`` is set, every answer carries ``Connection: close``.

    uvicorn closes a stopping server's idle keep-alive connections at once; a client that
    sent its next request on one just then got no answer and cannot know whether it was taken
    (one such request counted as cut in a gateway-stop test). While the gateway drains, the
    connections it has keep working and each closes after its answer, so a client's next
    request opens a new connection: refused here, it goes to another gateway."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.on = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Any) -> None:
            if self.on and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


async def _serve(settings: GatewaySettings, log_level: str) -> None:
    """Connect to NATS first, so an unreachable server is one clear error line (not a failed
    lifespan with a traceback), then serve until SIGINT/SIGTERM."""
    import asyncio

    import uvicorn

    from gateway.app import Connection, connect_nats, create_app

    connection = await connect_nats(settings)

    async def connected(_: GatewaySettings) -> Connection:
        return connection

    app = create_app(settings, connect=connected)
    draining = _Draining(app)
    config = uvicorn.Config(
        draining,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        # the backstop: what still runs this long after SIGTERM is cancelled (streams have
        # ended with an error event at the grace already)
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + STOP_BACKSTOP_S,
    )
    loop = asyncio.get_running_loop()

    class Server(uvicorn.Server):
        """On SIGTERM/SIGINT the gateway stops accepting connections, serves the ones it has
        for ``STOP_DRAIN_S`` (each answer closing its connection: ``_Draining``), then lets
        uvicorn close the idle ones and wait for the requests in flight; the gateway is told
        at once, so it can end long streams with an error event. A second signal stops at
        once."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not (draining.on or self.should_exit)
            gateway = getattr(app.state, "gateway", None)
            if first and gateway is not None:
                gateway.begin_stop(settings.shutdown_grace_s)
            if not first or not self.started:  # a second signal, or not serving yet
                super().handle_exit(sig, frame)
                return
            draining.on = True
            loop.call_soon_threadsafe(self._drain, sig, frame)

        def _drain(self, sig: int, frame: FrameType | None) -> None:
            for listening in self.servers:
                listening.close()  # new connections are refused from now on
            loop.call_later(STOP_DRAIN_S, super().handle_exit, sig, frame)

    server = Server(config)
    await server.serve()
    if not server.started:
        raise Unavailable(f"the gateway could not start on {settings.host}:{settings.port}")
