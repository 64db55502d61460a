"""The container backend: each function instance in its own container, from its function's
image, with a pool of pre-started containers per image.

A container runs ``python -m runtime.instance.worker`` (the same JSON-lines protocol as a child
process, through ``podman run -i``) with:

- the host's network (the instance serves on the node's address, as a process would);
- a read-only root file system and a ``/tmp`` tmpfs as its only scratch space;
- no capabilities, no new privileges, a pid limit; only the environment the instance needs
  (no store or NATS credentials, no node settings);
- ``/sllm`` a read-only slot with slave mount propagation (``runtime.container.mounts``): the
  node mounts the DRAM entries an idle container may premap there, and at load only the
  function's own entry remains; the node's cache directory and the DRAM tier are not mounted;
- memory and CPU limits from the function's ``resources``, written into its cgroup at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import xxhash

from runtime.backend.choice import VllmSupport
from runtime.container import cgroups, mounts
from runtime.container.images import ensure_function_image, requirement_lines
from runtime.container.podman import CA_IN_IMAGE, HOST_CA_BUNDLE, ContainerError, Podman
from runtime.node.worker_pool import WorkerPool
from runtime.node.worker_process import _LINE_LIMIT, WorkerProcess
from sllm.errors import Unavailable
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

SLOT = "/sllm"  # where a container sees its slot
SCRATCH_SIZE = "512m"  # /tmp tmpfs: handler files, library caches (counts as its memory)
PIDS_LIMIT = 4096
# the runtime image installs the `runtime` extra only: vLLM (several GB with its torch pins)
# is not in it, so functions that ask for it are refused and `auto` falls back to transformers
VLLM_IN_CONTAINERS = (
    "vLLM instances do not run in containers yet: the runtime image has no vLLM "
    "(SLLM_INSTANCES=process, `sllm up --instances process`, runs them as processes)"
)


class ContainerWorker(WorkerProcess):
    """An instance process inside a container; ``proc`` is its ``podman run -i`` client."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        started: float,
        podman: Podman,
        name: str,
        slot: Path,
        view: Path,
        tier_root: Path,
    ) -> None:
        super().__init__(proc, started)
        self.podman = podman
        self.name = name
        self.slot = slot
        self.view = view
        self.tier_root = tier_root
        self.host_pid = 0
        self.mounted: set[Path] = set()
        self.memory_limit = 0
        self._oom: cgroups.OomWatch | None = None
        self._detail = ""
        self._cleaned: asyncio.Task[None] | None = None

    async def wait_idle(self, timeout_s: float = 180.0) -> None:
        await super().wait_idle(timeout_s)
        out = await _podman_out(self.podman, "inspect", "--format", "{{.State.Pid}}", self.name)
        self.host_pid = int(out or 0)
        if self.host_pid <= 0:
            raise Unavailable(f"container {self.name} has no process")

    def node_pid(self) -> int:
        return self.host_pid

    def _renice(self, nice: int) -> None:
        """The threads' priority, and the container cgroup's CPU weight with it: the
        container started at the background weight (``--cpu-shares``, ``ContainerLauncher``)."""
        super()._renice(nice)
        try:
            cgroups.set_background(self.host_pid, nice > 0)
        except OSError as exc:
            log.warning("container %s keeps its CPU weight: %s", self.name, exc)

    def _target(self, entry: Path) -> tuple[Path, str]:
        rel = Path(entry).resolve().relative_to(self.tier_root.resolve())
        return self.slot / "dram" / rel, f"{SLOT}/dram/{rel.as_posix()}"

    def _mount_only(self, targets: dict[Path, Path]) -> None:
        """Leave exactly ``targets`` (slot path -> DRAM entry) mounted in the slot."""
        for target in sorted(self.mounted - set(targets), key=lambda p: len(str(p)), reverse=True):
            mounts.unmount(target)
            self.mounted.discard(target)
            with contextlib.suppress(OSError):  # not even the name of another checkpoint
                target.rmdir()
        for target, entry in targets.items():
            if target not in self.mounted:
                rel = Path(entry).resolve().relative_to(self.tier_root.resolve())
                mounts.bind(self.view / rel, target)
                self.mounted.add(target)

    async def attach(self, entry: Path, record: FunctionRecord, threads: int) -> str:
        target, inside = self._target(entry)
        self._mount_only({target: entry})
        self.memory_limit = record.spec.resources.memory_bytes
        try:
            cgroups.set_limits(self.host_pid, self.memory_limit, threads)
            self._oom = cgroups.OomWatch.open(self.host_pid)
        except OSError as exc:
            raise Unavailable(
                f"cannot limit container {self.name} to resources.memory="
                f"{self.memory_limit} bytes: {exc}"
            ) from None
        if self._oom is not None and self._oom.fd >= 0:
            asyncio.get_running_loop().add_reader(self._oom.fd, self._oom.check)
        return inside

    def handler_dir(self, default: Path) -> str:
        return ""  # the worker writes the handler's files into its own /tmp

    async def premap(self, entries: list[str]) -> None:
        targets = {}
        inside = []
        for entry in entries:
            target, path = self._target(Path(entry))
            targets[target] = Path(entry)
            inside.append(path)
        self._mount_only(targets)
        await self.send({"cmd": "premap", "entries": inside})

    @property
    def exit_detail(self) -> str:
        return self._detail

    def kill(self) -> None:
        if not self.alive():
            return
        if self.host_pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.host_pid, signal.SIGKILL)  # the container ends with its init
            return
        # still starting: no pid known yet
        subprocess.run(
            self.podman.command("rm", "-f", "-t", "0", self.name),
            env=self.podman.env(), capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    async def wait(self) -> int:
        code = await super().wait()
        if self._cleaned is None:
            self._cleaned = asyncio.ensure_future(self._clean_up(code))
        await asyncio.shield(self._cleaned)
        return code

    async def _clean_up(self, code: int) -> None:
        oom = self._oom
        if oom is not None:
            if oom.fd >= 0:
                asyncio.get_running_loop().remove_reader(oom.fd)
            oom.check()
            oom.close()
        if code != 0:
            inspected = await _podman_out(
                self.podman, "inspect", "--format", "{{.State.OOMKilled}}", self.name
            )
            if inspected == "true" or (oom is not None and oom.killed):
                self._detail = (
                    f" (out of memory: killed at its limit of {self.memory_limit} bytes, "
                    "resources.memory)"
                )
        await _podman_out(self.podman, "rm", "-f", "-t", "0", self.name)
        with contextlib.suppress(OSError):
            mounts.unmount_below(self.slot)
        self.mounted.clear()
        await asyncio.to_thread(shutil.rmtree, self.slot, True)


async def _podman_out(podman: Podman, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *podman.command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=podman.env(),
    )
    out, _ = await proc.communicate()
    return out.decode().strip() if proc.returncode == 0 else ""


class ContainerLauncher:
    """Starts instance containers of one image."""

    def __init__(self, backend: ContainerBackend, image: str) -> None:
        self.backend = backend
        self.image = image

    async def spawn(self, background: bool = False) -> WorkerProcess:
        from runtime.node.priority import ENV, idle_nice

        b = self.backend
        nice = idle_nice() if background else 0
        name = f"sllm-{b.node_id}-{uuid.uuid4().hex[:10]}"
        slot = b.slots / name
        (slot / "dram").mkdir(parents=True, exist_ok=True)
        args = [
            "run", "-i", "--name", name, "--label", f"sllm.node={b.label}",
            "--network", "host", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", f"/tmp:rw,nosuid,nodev,size={b.scratch},mode=1777",
            "--cap-drop", "all", "--security-opt", "no-new-privileges",
            "--pids-limit", str(PIDS_LIMIT), "--workdir", "/tmp",
            "--volume", f"{slot}:{SLOT}:ro,rslave",
            "--env", "HOME=/tmp", "--env", "HF_HOME=/tmp/huggingface",
        ]  # fmt: skip
        if nice:  # its cgroup's weight: SCHED_IDLE inside it does not rank it below instances
            args += ["--cpu-shares", str(cgroups.SHARES[True])]
        if HOST_CA_BUNDLE.is_file():  # HTTPS from a handler verifies as on the host
            args += ["--volume", f"{HOST_CA_BUNDLE}:{CA_IN_IMAGE}:ro"]
        for key, value in {**b.env, ENV: str(nice)}.items():
            args += ["--env", f"{key}={value}"]
        args += [self.image, "python", "-m", "runtime.instance.worker"]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *b.podman.command(*args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=b.podman.env(),
            limit=_LINE_LIMIT,
            start_new_session=True,
            # conmon writes an ``oom`` marker into its working directory when the container
            # is killed at its memory limit: the slot, removed with the container, not the
            # directory the node was started from
            cwd=slot,
        )
        worker = ContainerWorker(proc, started, b.podman, name, slot, b.view, b.tier_root)
        worker.nice = nice
        return worker


class ContainerBackend:
    """Instances in containers: a pool of ``pool_size`` pre-started containers per image.

    The runtime image's pool starts with the node; a function image's pool after its first
    load. An idle container premaps only DRAM entries of checkpoints that were loaded with its
    image before, so it never maps a checkpoint no function of its image uses.
    """

    kind = "container"

    def __init__(
        self,
        podman: Podman,
        runtime_image: str,
        node_id: str,
        cache_dir: Path,
        tier_root: Path,
        pool_size: int,
        env: dict[str, str],
        scratch: str = SCRATCH_SIZE,
    ) -> None:
        self.podman = podman
        self.runtime_image = runtime_image
        self.node_id = node_id
        self.slots = Path(cache_dir) / "containers"
        self.view = Path(cache_dir) / "dram-view"
        self.tier_root = Path(tier_root)
        self.pool_size = pool_size
        self.env = env
        self.scratch = scratch
        # containers of this node and cache directory carry this label (leftovers are removed)
        self.label = (
            f"{node_id}-{xxhash.xxh3_64_hexdigest(str(self.slots.resolve()).encode())[:10]}"
        )
        self.pools: dict[str, WorkerPool] = {}
        self.seen: dict[str, set[str]] = {}
        self._builds: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_mounts)
        self._pool(self.runtime_image).replenish()

    def _prepare_mounts(self) -> None:
        self.podman.remove_containers(f"sllm.node={self.label}")
        mounts.unmount_below(self.slots)
        shutil.rmtree(self.slots, ignore_errors=True)
        mounts.make_shared(self.slots)
        mounts.unmount(self.view)
        mounts.ro_view(self.tier_root, self.view)

    def _pool(self, image: str) -> WorkerPool:
        if image not in self.pools:
            self.pools[image] = WorkerPool(self.pool_size, ContainerLauncher(self, image))
            self.seen.setdefault(image, set())
        return self.pools[image]

    async def image_for(self, record: FunctionRecord) -> str:
        """The function's image, built now if this node has not built it yet."""
        key = "\n".join(requirement_lines(record.requirements))
        if not key:
            return self.runtime_image
        lock = self._builds.setdefault(key, asyncio.Lock())
        async with lock:  # one build per content, however many loads wait for it
            try:
                return await asyncio.to_thread(
                    ensure_function_image, self.podman, self.runtime_image, record.requirements
                )
            except ContainerError as exc:
                raise ContainerError(
                    f"building the image of {record.spec.name} failed: {exc.message}"
                ) from None

    async def prepare(self, record: FunctionRecord) -> None:
        """Build the function's image now (its deploy), not at its first cold start."""
        started = time.monotonic()
        image = await self.image_for(record)
        log.info(
            "image of %s ready: %s (%.1fs)", record.spec.name, image, time.monotonic() - started
        )

    async def take(
        self, record: FunctionRecord, engine: str, entry: str = ""
    ) -> tuple[WorkerProcess, bool]:
        if engine == "vllm":
            raise Unavailable(VLLM_IN_CONTAINERS)
        image = await self.image_for(record)
        pool = self._pool(image)
        self.seen[image].add(record.checkpoint)
        return await pool.take()

    async def vllm_support(self) -> VllmSupport:
        raise Unavailable(VLLM_IN_CONTAINERS)

    def replenish(self) -> None:
        for pool in self.pools.values():
            pool.replenish()

    async def set_premap(self, dram: dict[str, str]) -> None:
        for image, pool in self.pools.items():
            seen = self.seen.get(image, set())
            await pool.set_premap([dram[key] for key in sorted(dram) if key in seen])

    async def set_prebuild(self, spec: dict[str, Any], room_bytes: int) -> None:
        """Nothing: no vLLM instances run in containers (``VLLM_IN_CONTAINERS``)."""

    async def fit_prebuild(self, room_bytes: int) -> None:
        """Nothing: no idle process here holds a warm engine."""

    @property
    def idle(self) -> int:
        return sum(pool.idle for pool in self.pools.values())

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        await asyncio.to_thread(self._release_mounts)

    def _release_mounts(self) -> None:
        with contextlib.suppress(ContainerError):
            self.podman.remove_containers(f"sllm.node={self.label}")
        mounts.unmount_below(self.slots)
        mounts.unmount(self.view)
        shutil.rmtree(self.slots, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.view.rmdir()
