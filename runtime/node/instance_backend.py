"""The seam between the supervisor and how instances are started: ``InstanceBackend``, and
``ProcessBackend`` (instances as plain child processes of the node, a pool of pre-started
ones per inference engine). ``runtime.container.backend.ContainerBackend`` is the other."""

from __future__ import annotations

from typing import Any, Protocol

from runtime.backend.choice import VllmSupport
from runtime.node.worker_pool import WorkerPool
from runtime.node.worker_process import ProcessLauncher, WorkerProcess
from sllm.errors import Unavailable
from sllm.spec import FunctionRecord


class InstanceBackend(Protocol):
    """How the node starts instances and keeps pre-started ones: the supervisor's port.
    ``engine`` is the inference backend an instance runs (``transformers`` or ``vllm``,
    ``runtime.backend.choice``); a vLLM process has vLLM imported while it waits."""

    kind: str  # "process" | "container"

    async def start(self) -> None: ...

    async def take(
        self, record: FunctionRecord, engine: str, entry: str = ""
    ) -> tuple[WorkerProcess, bool]:
        """A process ready for ``record``'s load line, and whether it was pre-started.
        ``entry``: the node's DRAM entry the load maps (a vLLM process holding that model's
        warm engine is preferred)."""
        ...

    async def vllm_support(self) -> VllmSupport:
        """What the vLLM of this backend's processes runs; Unavailable naming why when it
        starts no vLLM processes."""
        ...

    def replenish(self) -> None: ...

    async def prepare(self, record: FunctionRecord) -> None:
        """Get ready for ``record`` ahead of its loads (a container backend builds its image)."""
        ...

    async def set_premap(self, dram: dict[str, str]) -> None:
        """The DRAM tier's entries (checkpoint key -> node path) idle processes may map."""
        ...

    async def set_prebuild(self, spec: dict[str, Any], room_bytes: int) -> None:
        """The load spec of the latest vLLM instance on a CPU: idle vLLM processes build
        engines for the models loaded last, this one first, while they wait (a scale-up or a
        cold start after scale-to-zero then takes one), as far as they fit in ``room_bytes``
        (``WorkerPool.set_prebuild``). Its ``secret`` is the running instance's: dropped."""
        ...

    async def fit_prebuild(self, room_bytes: int) -> None:
        """Idle processes free their warm engines when those no longer fit in ``room_bytes``."""
        ...

    @property
    def idle(self) -> int: ...

    async def close(self) -> None: ...


class ProcessBackend:
    """Instances as child processes of the node, sharing its environment and files (for
    development and tests). A pool per engine (the vLLM one only when ``vllm_missing`` is
    None); idle processes premap every DRAM entry."""

    kind = "process"

    def __init__(
        self,
        pool_size: int,
        env: dict[str, str],
        vllm_pool_size: int = 1,
        vllm_missing: str | None = "vLLM is not installed on this node",
        vllm_spare: int = 0,
    ) -> None:
        self.pool = WorkerPool(
            pool_size, ProcessLauncher({**env, "SLLM_WORKER_BACKEND": "transformers"})
        )
        self.vllm_missing = vllm_missing or ""
        self.vllm_pool = (
            WorkerPool(
                vllm_pool_size,
                ProcessLauncher({**env, "SLLM_WORKER_BACKEND": "vllm"}),
                backend="vllm",
                spare=vllm_spare,
            )
            if vllm_missing is None
            else None
        )

    def _pools(self) -> list[WorkerPool]:
        return [self.pool] if self.vllm_pool is None else [self.pool, self.vllm_pool]

    async def start(self) -> None:
        self.replenish()

    async def take(
        self, record: FunctionRecord, engine: str, entry: str = ""
    ) -> tuple[WorkerProcess, bool]:
        if engine != "vllm":
            return await self.pool.take()
        if self.vllm_pool is None:
            raise Unavailable(self.vllm_missing)
        return await self.vllm_pool.take(entry)

    async def vllm_support(self) -> VllmSupport:
        if self.vllm_pool is None:
            raise Unavailable(self.vllm_missing)
        try:
            idle = await self.vllm_pool.probe()
        except Unavailable as exc:
            raise Unavailable(
                f"vLLM processes fail to start on this node ({exc.message})"
            ) from None
        try:
            return VllmSupport.from_dict(idle["vllm"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(
                f"vLLM processes of this node describe it unreadably: {exc!r}"
            ) from None

    def replenish(self) -> None:
        for pool in self._pools():
            pool.replenish()

    async def prepare(self, record: FunctionRecord) -> None:
        """Nothing: child processes share the node's environment (its packages)."""

    async def set_premap(self, dram: dict[str, str]) -> None:
        for pool in self._pools():
            await pool.set_premap([dram[key] for key in sorted(dram)])

    async def set_prebuild(self, spec: dict[str, Any], room_bytes: int) -> None:
        if self.vllm_pool is not None:
            kept = {k: v for k, v in spec.items() if k != "secret"}
            await self.vllm_pool.set_prebuild(kept, room_bytes)

    async def fit_prebuild(self, room_bytes: int) -> None:
        if self.vllm_pool is not None:
            await self.vllm_pool.fit_prebuild(room_bytes)

    @property
    def idle(self) -> int:
        return sum(pool.idle for pool in self._pools())

    async def close(self) -> None:
        for pool in self._pools():
            await pool.close()
