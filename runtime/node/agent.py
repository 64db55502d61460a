"""The node agent: answers commands on ``sllm.node.<id>.cmd`` and publishes heartbeats.

Gather, decide, apply: a command is decoded (``ProtocolError`` on anything malformed, answered
with an error reply; the node stays up), handed to the ``Supervisor`` and answered with a
``CmdReply``. The heartbeat loop gathers device, instance, cache and bandwidth state and
publishes one ``NodeHeartbeat`` every ``heartbeat_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from runtime.backend.vllm_process import vllm_unavailable
from runtime.migration.node import run_migrate_command
from runtime.node.devices import Device, DeviceTable, threads_per_slot
from runtime.node.instance_backend import InstanceBackend, ProcessBackend
from runtime.node.supervisor import CheckpointCache, Supervisor
from sllm.bus import Bus, Message, Subscription
from sllm.clock import Clock
from sllm.errors import ProtocolError, SllmError, Unavailable
from sllm.instance_auth import auth_header
from sllm.messages import (
    CacheEntryState,
    CmdReply,
    DrainCmd,
    LoadCmd,
    LogLine,
    MigrateCmd,
    NodeHeartbeat,
    PrepareCmd,
    UnloadCmd,
    decode,
    encode,
    event_subject,
    heartbeat_subject,
    log_subject,
    node_cmd_subject,
)
from sllm.settings import NodeSettings
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)


class NodeCache(CheckpointCache, Protocol):
    """``TieredCache`` as the agent sees it: fetch/release plus what heartbeats report."""

    def contents(self) -> dict[str, list[tuple[str, int, bool]]]: ...


def instance_env(devices: list[Device]) -> dict[str, str]:
    """Environment of every instance process: torch's threads per CPU slot."""
    slots = sum(1 for d in devices if d.kind == "cpu")
    return {"SLLM_INSTANCE_THREADS": str(threads_per_slot(slots))} if slots else {}


def process_backend(settings: NodeSettings, devices: list[Device]) -> ProcessBackend:
    """Instances as child processes, with a vLLM pool when this node offers vLLM
    (``SLLM_VLLM``; ValidationFailed when it is ``on`` and vLLM is not installed)."""
    return ProcessBackend(
        settings.pool_size,
        instance_env(devices),
        settings.vllm_pool_size,
        vllm_unavailable(settings.vllm),
        settings.vllm_spare,
    )


class NodeAgent:
    def __init__(
        self,
        settings: NodeSettings,
        bus: Bus,
        cache: NodeCache,
        devices: list[Device],
        clock: Clock,
        bandwidths: Any = None,
        dram_entry: Callable[[str], Path] | None = None,
        backend: InstanceBackend | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.bus = bus
        self.cache = cache
        self.clock = clock
        self.bandwidths = bandwidths
        # DRAM key -> entry directory, for the pool's premap: CPU nodes only, where instances
        # use the mapping in place (on CUDA, mapping in an idle process would pin it and open
        # a CUDA context there; the copy to the device reads the pages anyway)
        cpu_only = all(d.kind == "cpu" for d in devices)
        self.dram_entry = dram_entry if cpu_only else None
        self.devices = DeviceTable(devices)
        slots = sum(1 for d in devices if d.kind == "cpu")
        self.backend = backend or process_backend(settings, devices)
        self.supervisor = Supervisor(
            node_id=self.node_id,
            host=settings.host,
            cache=cache,
            backend=self.backend,
            devices=self.devices,
            publish_event=self._publish_event,
            publish_log=self._publish_log,
            cpu_slots=max(slots, 1),
            handler_root=Path(settings.cache_dir) / "handlers",
            cache_dir=str(settings.cache_dir),
            dram_capacity=settings.dram_capacity,
            refill_after_s=settings.pool_refill_after_s,
        )
        self.seq = 0
        self.draining = False
        self._sub: Subscription | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=1.0)
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        await self.backend.start()
        self._sub = await self.bus.subscribe(node_cmd_subject(self.node_id), self.handle)
        self._heartbeats = asyncio.create_task(self._heartbeat_loop())
        backend = self.backend
        vllm = backend.vllm_pool if isinstance(backend, ProcessBackend) else None
        log.info(
            "node %s up devices=%s instances=%s pool=%d vllm_pool=%s",
            self.node_id, ",".join(self.devices.devices), backend.kind, self.settings.pool_size,
            f"{vllm.size} (+{vllm.spare} spare)" if vllm is not None else "0 (vLLM off)",
        )  # fmt: skip

    async def stop(self, drain_s: float = 30.0) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await self.supervisor.drain_all(drain_s)
        await self.backend.close()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
        await self._http.aclose()

    # -- commands ---------------------------------------------------------------------------
    async def handle(self, msg: Message) -> bytes | None:
        """Answer one command. The bus runs a subscription's handler one message at a time,
        so a migration (seconds) runs as a task that publishes its reply to ``reply_to``
        itself, and loads and unloads sent meanwhile are not held up behind it."""
        try:
            command = decode(msg.data)
        except SllmError as exc:
            return encode(CmdReply(ok=False, code=exc.code, message=exc.message))
        if isinstance(command, MigrateCmd) and msg.reply_to:
            task = asyncio.create_task(self._answer_later(command, msg.reply_to))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return None
        return encode(await self._answer(command))

    async def _answer(self, command: object) -> CmdReply:
        try:
            return CmdReply(ok=True, data=await self._dispatch(command))
        except SllmError as exc:
            return CmdReply(ok=False, code=exc.code, message=exc.message)
        except Exception as exc:  # a bug must not take the node down: answer and log it
            log.exception("command failed")
            return CmdReply(ok=False, code="internal", message=f"{type(exc).__name__}: {exc}")

    async def _answer_later(self, command: object, reply_to: str) -> None:
        reply = await self._answer(command)
        try:
            await self.bus.publish(reply_to, encode(reply))
        except Exception as exc:
            log.warning("could not send a command reply: %s", exc)

    async def _dispatch(self, command: object) -> dict[str, Any]:
        if isinstance(command, LoadCmd):
            if self.draining:
                raise Unavailable(f"node {self.node_id} is draining")
            return self.supervisor.load(command)
        if isinstance(command, UnloadCmd):
            return await self.supervisor.unload(command.instance_id, command.drain_s)
        if isinstance(command, DrainCmd):
            self.draining = True
            task = asyncio.create_task(self.supervisor.drain_all(command.drain_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return {"instances": len(self.supervisor.instances)}
        if isinstance(command, PrepareCmd):
            return self._prepare(FunctionRecord.from_dict(command.record))
        if isinstance(command, MigrateCmd):
            return await run_migrate_command(self.supervisor.instances, command, self.bus.publish)
        raise ProtocolError(f"{type(command).__name__} is not a node command")

    def _prepare(self, record: FunctionRecord) -> dict[str, Any]:
        """A function was deployed: let the backend get ready for it in the background (an
        image build takes seconds to minutes; its errors are logged, and a load of the function
        builds again and reports them)."""

        async def prepare() -> None:
            try:
                await self.backend.prepare(record)
            except Exception as exc:
                message = exc.message if isinstance(exc, SllmError) else repr(exc)
                log.warning("preparing %s failed: %s", record.spec.name, message)

        task = asyncio.create_task(prepare())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return {"preparing": record.spec.name}

    # -- publishing ---------------------------------------------------------------------------
    async def _publish_event(self, event: object) -> None:
        await self.bus.publish(event_subject(self.node_id), encode(event))

    async def _publish_log(self, line: object) -> None:
        assert isinstance(line, LogLine)
        await self.bus.publish(log_subject(self.node_id, line.function), encode(line))

    # -- heartbeats ---------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.publish_heartbeat()
            except Exception as exc:  # NATS down: keep trying, the client reconnects
                log.warning("heartbeat not published: %s", exc)
            await self.clock.sleep(self.settings.heartbeat_s)

    async def publish_heartbeat(self) -> NodeHeartbeat:
        await self._poll_instances()
        contents = await asyncio.to_thread(self.cache.contents)
        if self.dram_entry is not None and not self.supervisor.loading():
            # not while a load runs: populating a premap competes with it for the cores
            keys = sorted(key for key, _, _ in contents.get("dram", []))
            await self.backend.set_premap({key: str(self.dram_entry(key)) for key in keys})
        self.seq += 1
        heartbeat = NodeHeartbeat(
            node_id=self.node_id,
            seq=self.seq,
            devices=self.devices.states(),
            instances=self.supervisor.states(),
            cache={
                tier: [CacheEntryState(key, nbytes, in_use) for key, nbytes, in_use in entries]
                for tier, entries in contents.items()
            },
            bandwidths=self.bandwidths.snapshot() if self.bandwidths is not None else {},
            load_queue_s=self._load_queue_s(),
            cache_capacity={
                "ssd": self.settings.ssd_capacity,
                "dram": self.settings.dram_capacity,
            },
            pool_idle=self.backend.idle,
        )
        await self.bus.publish(heartbeat_subject(self.node_id), encode(heartbeat))
        return heartbeat

    def _load_queue_s(self) -> float:
        """Loads already running share the node's disk and cores: a new one waits roughly
        one typical load per load in progress."""
        loading = self.supervisor.loading()
        if not loading:
            return 0.0
        typical = statistics.median(self.supervisor.recent_load_s or [1.0])
        return loading * typical

    async def _poll_instances(self) -> None:
        ready = [i for i in self.supervisor.instances.values() if i.address and i.worker]

        async def poll(inst: Any) -> None:
            try:
                response = await self._http.get(
                    f"{inst.address}/healthz", headers=auth_header(inst.secret)
                )
                body = response.json()
            except (httpx.HTTPError, ValueError):
                return
            inst.in_flight = int(body.get("in_flight", 0))
            inst.tokens_in = int(body.get("tokens_in", 0))
            inst.tokens_out = int(body.get("tokens_out", 0))

        await asyncio.gather(*(poll(i) for i in ready))
