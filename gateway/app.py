"""The gateway's composition root: settings -> bus, registry bucket, clock, scheduler, HTTP
client -> ``GatewayService`` -> Starlette app with one route module per API area. Only
assembles; the behaviour lives in the modules it wires."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from gateway.http_errors import HANDLERS
from gateway.instance_http import InstanceHttpClient
from gateway.migration import routes as migration
from gateway.placement import PolicyScheduler
from gateway.registry import BUCKET
from gateway.routes import invoke, keys, openai, ops, system
from gateway.service import GatewayService
from sllm.bus import Bus, KeyValue, MemoryKeyValue
from sllm.clock import Clock, SystemClock
from sllm.settings import GatewaySettings


@dataclass(frozen=True)
class Connection:
    """The bus and the buckets the gateways share: the registry (functions, keys, migration
    fits), the leader lease and the leader's scale state. Without the last two (unit tests)
    the gateway gets buckets of its own and decides alone."""

    bus: Bus
    registry: KeyValue
    lease: KeyValue | None = None
    scale: KeyValue | None = None


Connect = Callable[[GatewaySettings], Awaitable[Connection]]

# 5 s to connect to an instance on the node's loopback or LAN: past that it is gone.
CONNECT_TIMEOUT_S = 5.0


async def connect_nats(settings: GatewaySettings) -> Connection:
    from gateway.leadership import open_lease_bucket
    from gateway.lease import LeaseConfig
    from gateway.scale_state import SCALE_BUCKET
    from sllm.nats_bus import NatsBus

    # buffer=False: a command or registry write the gateway gave up on must not be sent late
    bus = await NatsBus.connect(
        settings.nats_urls,
        name="sllm-gateway",
        seed_file=settings.nats_seed_file,
        buffer=False,
    )
    replicas = settings.nats_replicas
    return Connection(
        bus,
        await bus.key_value(BUCKET, replicas=replicas),
        await open_lease_bucket(bus, replicas, LeaseConfig()),
        await bus.key_value(SCALE_BUCKET, replicas=replicas, history=1),
    )


def instance_client(settings: GatewaySettings) -> InstanceHttpClient:
    """Pooled keep-alive connections to instances (a new TCP connection per request would
    cost more than the whole gateway hop)."""
    return InstanceHttpClient(CONNECT_TIMEOUT_S, settings.request_timeout_s)


def create_app(
    settings: GatewaySettings,
    *,
    connect: Connect = connect_nats,
    http: Callable[[], InstanceHttpClient] | None = None,
    clock: Clock | None = None,
    scheduler: PolicyScheduler | None = None,
    tick_s: float = 0.5,
    settle_s: float = 3.0,
) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connection = await connect(settings)
        bus = connection.bus
        client = http() if http is not None else instance_client(settings)
        gateway = GatewayService(
            settings,
            bus,
            connection.registry,
            clock or SystemClock(),
            client,
            scheduler,
            tick_s=tick_s,
            settle_s=settle_s,
            lease_kv=connection.lease or MemoryKeyValue(),
            scale_kv=connection.scale or MemoryKeyValue(),
        )
        app.state.gateway = gateway
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            await client.aclose()
            await bus.close()

    return Starlette(
        routes=[
            *invoke.routes,
            *openai.routes,
            *system.routes,
            *keys.routes,
            *migration.routes,
            *ops.routes,
        ],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
