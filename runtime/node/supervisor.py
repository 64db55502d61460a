"""The instance supervisor: load, watch and stop the node's instances.

A load is acknowledged at once and then runs as a task: pull the checkpoint down the tiers to
a DRAM image (a thread), hand it to a pre-started instance process, wait for ``ready``. Every
way an instance can end (unload, drain, failed load, the process dying) goes through
``_ended``, which frees the device, releases the DRAM entry and publishes one event.
Commands are idempotent by instance id: a repeated load or unload reports the current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil

from runtime.backend.choice import BackendChoice, ModelFacts, choose_backend
from runtime.instance.load_spec import LoadSpec
from runtime.node.devices import DeviceTable, threads_per_slot
from runtime.node.instance_backend import InstanceBackend
from runtime.node.instance_record import Instance, Laps
from runtime.node.worker_process import WorkerProcess
from sllm.errors import Conflict, SllmError, Unavailable, ValidationFailed
from sllm.messages import EventKind, InstanceEvent, InstanceState, LoadCmd, LogLine
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

# A load that is not ready in 10 minutes has failed (a 2 GB store pull here takes ~10 s).
READY_TIMEOUT_S = 600.0
# An instance acknowledges a drain command within milliseconds; one that does not is stuck.
DRAIN_ACK_TIMEOUT_S = 5.0
# Ended instances remembered for idempotent replies to repeated commands.
TOMBSTONES = 256


class CheckpointCache(Protocol):
    """What the supervisor needs of ``runtime.cache.TieredCache``."""

    def fetch(self, key: str) -> Any: ...

    def release(self, key: str) -> None: ...


Publish = Callable[[object], Coroutine[Any, Any, None]]


class Supervisor:
    def __init__(
        self,
        node_id: str,
        host: str,
        cache: CheckpointCache,
        backend: InstanceBackend,
        devices: DeviceTable,
        publish_event: Publish,
        publish_log: Publish,
        cpu_slots: int,
        handler_root: Path,
        cache_dir: str = "",
        memory_bytes: int = 0,
        dram_capacity: int = 0,
        refill_after_s: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.refill_after_s = refill_after_s
        self.host = host
        self.cache = cache
        self.backend = backend
        self.cache_dir = cache_dir
        self.devices = devices
        self.publish_event = publish_event
        self.publish_log = publish_log
        self.cpu_slots = cpu_slots
        self.handler_root = handler_root  # per-instance dirs of custom handlers' files
        # the machine's memory (0: all of it) and what the DRAM tier may fill of it: what is
        # left once the CPU instances' budgets are counted is what warm engines may hold
        self.memory_bytes = memory_bytes or int(psutil.virtual_memory().total)
        self.dram_capacity = dram_capacity
        self.instances: dict[str, Instance] = {}
        self.ended: dict[str, Instance] = {}
        self.recent_load_s: list[float] = []
        self._background: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Condition()  # notified whenever an instance gives a device back

    # -- commands ---------------------------------------------------------------------------
    def load(self, cmd: LoadCmd) -> dict[str, Any]:
        """Start loading (returns at once with the instance's state)."""
        known = self.instances.get(cmd.instance_id)
        if known is not None:
            if known.function != cmd.function:
                raise Conflict(
                    f"instance {cmd.instance_id} already exists for function {known.function}"
                )
            return {"state": known.state, "device": known.device, "address": known.address}
        if cmd.instance_id in self.ended:
            gone = self.ended[cmd.instance_id]
            raise Conflict(
                f"instance {cmd.instance_id} already ran here and is {gone.state}; "
                "use a new instance id"
            )
        try:
            record = FunctionRecord.from_dict(cmd.record)
        except ValidationFailed as exc:
            raise ValidationFailed(f"load: invalid function record: {exc.message}") from None
        if record.spec.name != cmd.function:
            raise ValidationFailed(
                f"load: function {cmd.function!r} does not match the record's {record.spec.name!r}"
            )
        queued = self._stopping_holder(cmd.device) is not None
        device = cmd.device if queued else self.devices.allocate(cmd.device, cmd.instance_id)
        inst = Instance(cmd.instance_id, cmd.function, device, record, queued=queued)
        self.instances[cmd.instance_id] = inst
        inst.task = asyncio.create_task(self._run(inst), name=f"instance-{cmd.instance_id}")
        log.info("load %s function=%s device=%s", inst.instance_id, inst.function, device)
        return {"state": inst.state, "device": device, "address": None}

    async def unload(self, instance_id: str, drain_s: float) -> dict[str, Any]:
        inst = self.instances.get(instance_id)
        if inst is None:
            gone = self.ended.get(instance_id)
            return {"state": gone.state if gone else "absent"}
        if not inst.stopping:
            inst.stopping = True
            if inst.worker is not None and inst.state == "ready":
                inst.state = "draining"
                with contextlib.suppress(SllmError, TimeoutError):
                    await inst.worker.send({"cmd": "drain", "drain_s": drain_s})
                    # reply once the instance refuses new requests (a few ms), so a request
                    # sent after the unload's reply is never accepted
                    await asyncio.wait_for(inst.drain_started.wait(), DRAIN_ACK_TIMEOUT_S)
                task = asyncio.create_task(self._kill_after(inst, drain_s + 10.0))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            elif inst.worker is not None:  # the process is loading the model: stop it now
                inst.worker.kill()
            # else: the fetch thread runs to its end, then the load task sees ``stopping``
            # (cancelling it mid-fetch would leave the DRAM entry it acquires pinned)
            async with self._freed:  # wakes the load if it is queued for a device
                self._freed.notify_all()
        return {"state": inst.state}

    async def drain_all(self, drain_s: float) -> None:
        for instance_id in list(self.instances):
            await self.unload(instance_id, drain_s)
        tasks = [i.task for i in self.instances.values() if i.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s + 15.0)

    def _stopping_holder(self, device: str) -> Instance | None:
        """The instance holding ``device`` if it is stopping and nobody queued behind it yet:
        a load for that device (the gateway evicting an idle instance for another function)
        then fetches its checkpoint while the holder drains and takes the device after it."""
        holder = self.instances.get(self.devices.holder.get(device, ""))
        if holder is None or not holder.stopping:
            return None
        if any(i.queued and i.device == device for i in self.instances.values()):
            return None
        return holder

    async def _take_device(self, inst: Instance) -> None:
        async with self._freed:
            while inst.device in self.devices.holder and not inst.stopping:
                await self._freed.wait()
        if not inst.stopping:
            self.devices.allocate(inst.device, inst.instance_id)
        inst.queued = False

    def prebuild_room(self) -> int:
        """Memory (bytes) that idle processes may hold as warm engines: the machine's, less
        the DRAM tier's capacity and the ``resources.memory`` of every CPU instance this node
        runs, loads or stops (each may use all of its budget)."""
        promised = sum(
            inst.record.spec.resources.memory_bytes
            for inst in self.instances.values()
            if inst.device.startswith("cpu")
        )
        return self.memory_bytes - self.dram_capacity - promised

    def states(self) -> list[InstanceState]:
        return [i.to_state() for i in self.instances.values()]

    def loading(self) -> int:
        return sum(1 for i in self.instances.values() if i.state == "loading")

    # -- one instance's life ------------------------------------------------------------------
    async def _run(self, inst: Instance) -> None:
        started = time.monotonic()
        try:
            laps = Laps()
            fetched = await asyncio.to_thread(self.cache.fetch, inst.record.checkpoint)
            laps.mark("fetch_s")
            inst.fetched = True
            inst.tier = str(fetched.tier)
            choice = await self._choose_backend(inst, Path(fetched.directory))
            inst.backend, inst.backend_reason = choice.backend, choice.reason
            if inst.queued:
                await self._take_device(inst)
            laps.mark("backend_s")  # with the wait for a stopping instance's device
            if inst.stopping:  # unloaded while the checkpoint was being fetched
                raise asyncio.CancelledError
            worker, inst.pre_started = await self.backend.take(
                inst.record, inst.backend, str(fetched.directory)
            )
            inst.worker = worker
            # the other idle processes' warm engines give way to the instance now counted
            await self.backend.fit_prebuild(self.prebuild_room())
            laps.mark("take_s")
            if inst.stopping:  # unloaded while an image was built or a process started
                raise asyncio.CancelledError
            worker.on_log = lambda line: self._log(inst, line)
            threads = self._threads(inst)
            entry_dir = await worker.attach(Path(fetched.directory), inst.record, threads)
            laps.mark("attach_s")  # a container's mounts and limits
            await worker.send(self._load_spec(inst, entry_dir, threads))
            message = await worker.next_event(READY_TIMEOUT_S)
            laps.mark("instance_s")  # from the load spec sent to the instance's ready line
            if message.get("event") != "ready":
                failure = str(message.get("code") or "load_failed")
                raise SllmError(str(message.get("error") or message), code=failure)
            inst.address = f"http://{self.host}:{int(message['port'])}"
            inst.timings = {k: float(v) for k, v in dict(message.get("timings", {})).items()}
            inst.timings.update(laps.seconds)
            inst.engine = str(message.get("engine", ""))
            inst.load_s = time.monotonic() - started
            self._remember_load(inst.load_s)
            inst.state = "draining" if inst.stopping else "ready"
            log.info(
                "instance %s ready address=%s tier=%s load_s=%.3f pre_started=%s backend=%s "
                "engine=%s timings=%s",
                inst.instance_id, inst.address, inst.tier, inst.load_s, inst.pre_started,
                inst.backend, inst.engine or "-",
                json.dumps({k: round(v, 3) for k, v in inst.timings.items()}),
            )  # fmt: skip
            await self._event(inst, "ready")
            # the next vLLM load is likely this model again; an idle process holds no device,
            # so only a CPU engine is built ahead (on CUDA it would take the instance's GPU)
            if inst.backend == "vllm" and inst.device.startswith("cpu"):
                spec = self._load_spec(inst, entry_dir, threads)
                await self.backend.set_prebuild(spec, self.prebuild_room())
            await self._follow(inst, worker)
            code = await worker.wait()
            if inst.stopping:
                await self._ended(inst, "stopped", "")
            else:
                error = f"instance process exited with code {code}{worker.exit_detail}"
                await self._ended(inst, "failed", error)
        except asyncio.CancelledError:
            await self._ended(inst, "stopped", "")
        except Exception as exc:
            error = exc.message if isinstance(exc, SllmError) else f"{type(exc).__name__}: {exc}"
            inst.error_code = exc.code if isinstance(exc, SllmError) else "load_failed"
            if inst.stopping:
                await self._ended(inst, "stopped", "")
            else:
                await self._ended(inst, "failed", error)
        finally:
            self.backend.replenish()

    async def _follow(self, inst: Instance, worker: WorkerProcess) -> None:
        """Read the ready instance's control lines until it exits (``draining`` acks an
        unload's drain command) and refill the pool once the instance said ``quiet`` (its
        first request answered, none in flight), or ``refill_after_s`` after ready when no
        request came. A new pool process imports torch, warms up, maps the DRAM images and
        builds their models: beside the instance's first request it made that request's
        first token take 0.7-2.2 s instead of 0.12 s (SmolLM2 on this 2-core VM, the
        refill at nice 10; kernel work such as page faults is not preempted here)."""
        refill = asyncio.get_running_loop().call_later(self.refill_after_s, self.backend.replenish)
        try:
            while True:
                try:
                    message = await worker.next_event(None)
                except Unavailable:
                    return
                if message.get("event") == "draining":
                    inst.drain_started.set()
                elif message.get("event") == "quiet":  # sent once
                    refill.cancel()
                    self.backend.replenish()
        finally:
            refill.cancel()  # the instance ended: its load's ``finally`` refills

    def _threads(self, inst: Instance) -> int:
        return threads_per_slot(self.cpu_slots) if inst.device.startswith("cpu") else 0

    def _load_spec(self, inst: Instance, entry_dir: str, threads: int) -> dict[str, Any]:
        spec = inst.record.spec
        assert inst.worker is not None
        return LoadSpec(
            instance_id=inst.instance_id,
            function=inst.function,
            handler=spec.handler,
            entry_dir=entry_dir,
            device=inst.device,
            host=self.host,
            env=dict(spec.env),
            generation={
                "max_tokens": spec.generation.max_tokens,
                "temperature": spec.generation.temperature,
                "top_p": spec.generation.top_p,
            },
            handler_source=dict(inst.record.handler_source),
            handler_dir=inst.worker.handler_dir(self.handler_root / inst.instance_id),
            threads=threads,
            secret=inst.secret,
            backend=inst.backend,
            memory_bytes=spec.resources.memory_bytes,
            cache_dir=self.cache_dir,
        ).to_json()

    async def _choose_backend(self, inst: Instance, entry_dir: Path) -> BackendChoice:
        """ValidationFailed (a failed load naming why) when the spec's backend cannot run."""
        requested = inst.record.spec.backend
        support, missing = None, ""
        if requested != "transformers":
            try:
                support = await self.backend.vllm_support()
            except SllmError as exc:  # this node starts no vLLM processes: it says why
                missing = exc.message
        facts = await asyncio.to_thread(ModelFacts.read, entry_dir)
        on_cpu = inst.device.startswith("cpu")
        return choose_backend(requested, facts, support, on_cpu=on_cpu, vllm_missing=missing)

    async def _kill_after(self, inst: Instance, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if inst.worker is not None and inst.worker.alive():
            log.warning("instance %s did not stop after draining; killing it", inst.instance_id)
            inst.worker.kill()

    async def _ended(self, inst: Instance, state: Literal["failed", "stopped"], error: str) -> None:
        if inst.worker is not None:
            inst.worker.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(inst.worker.wait(), 10.0)
        if inst.fetched:
            inst.fetched = False
            await asyncio.to_thread(self.cache.release, inst.record.checkpoint)
        self.devices.release(inst.device, inst.instance_id)
        handler_dir = self.handler_root / inst.instance_id
        await asyncio.to_thread(shutil.rmtree, handler_dir, True)
        async with self._freed:
            self._freed.notify_all()
        inst.state, inst.error, inst.in_flight = state, error, 0
        self.instances.pop(inst.instance_id, None)
        self.ended[inst.instance_id] = inst
        while len(self.ended) > TOMBSTONES:
            self.ended.pop(next(iter(self.ended)))
        if state == "failed":
            log.warning("instance %s failed: %s", inst.instance_id, error)
        else:
            log.info("instance %s stopped", inst.instance_id)
        await self._event(inst, state)

    async def _event(self, inst: Instance, kind: EventKind) -> None:
        event = InstanceEvent(
            kind=kind,
            instance_id=inst.instance_id,
            node_id=self.node_id,
            function=inst.function,
            address=inst.address if kind == "ready" else None,
            error=inst.error,
            tier=inst.tier,
            load_s=inst.load_s,
            revision=inst.record.revision,
            secret=inst.secret if kind == "ready" else "",
            code=inst.error_code if kind == "failed" else "",
            backend=inst.backend,
            backend_reason=inst.backend_reason,
        )
        try:
            await self.publish_event(event)
        except Exception:
            log.warning("could not publish %s event of %s", kind, inst.instance_id, exc_info=True)

    def _log(self, inst: Instance, line: str) -> None:
        message = LogLine(inst.function, inst.instance_id, self.node_id, line)

        async def publish() -> None:
            with contextlib.suppress(Exception):  # logs are best effort while NATS is down
                await self.publish_log(message)

        task = asyncio.get_running_loop().create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _remember_load(self, seconds: float) -> None:
        self.recent_load_s = [*self.recent_load_s[-9:], seconds]
