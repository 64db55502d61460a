"""The pool of pre-started instance processes of one backend (``WorkerPool``).

A process (``runtime.node.worker_process.WorkerProcess``) is started by a ``Launcher`` ahead of
need, waits idle at background priority (``runtime.node.priority``), keeps the node's DRAM
images premapped and, in a vLLM pool, the warm engine of a model loaded recently; ``take``
hands one to a load.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from runtime.node.worker_process import Launcher, WorkerProcess
from sllm.errors import Unavailable

log = logging.getLogger(__name__)


def _entry(spec: dict[str, Any]) -> str:
    """The DRAM entry directory a load spec maps: what tells models apart in the pool."""
    return str(spec.get("entry_dir", ""))


class WorkerPool:
    """Keeps ``size`` idle pre-started processes of one backend (and ``spare`` more in a vLLM
    pool, which hold no warm engine). ``take`` hands one out (starting a fresh one when the
    pool is empty or ``size`` is 0); ``replenish`` refills in the background. The supervisor
    replenishes after a load finished and the new instance answered its first request
    (``Supervisor._follow``): a process starting while another loads or answers would compete
    for the same cores (2 here) and slow the cold start it is meant to speed. ``backend``
    "vllm": the processes import vLLM (``SLLM_WORKER_BACKEND``).
    """

    def __init__(
        self, size: int, launcher: Launcher, backend: str = "transformers", spare: int = 0
    ) -> None:
        self.size = size
        # vLLM: processes kept beyond ``size`` that never hold a warm engine, so that a load of a
        # model no idle process holds builds at once instead of first freeing another model's
        # engine (vLLM's teardown: the 1.1B's first token 0.69 s sooner on average here,
        # bench/vllm_built.py); started once the ``size`` others are idle, never delaying those
        self.spare = spare if size > 0 else 0
        self.launcher = launcher
        self.backend = backend
        self.idle_line: dict[str, Any] | None = None  # the first idle line any process sent
        # importing vLLM takes 6-10 s on a quiet 2-core machine and several times that loaded
        self.start_timeout_s = 300.0 if backend == "vllm" else 180.0
        # why a process of this pool could not start; a vLLM pool does not retry (its imports
        # fail the same way each time, and each try costs seconds of CPU)
        self.start_error: str | None = None
        self._idle: list[WorkerProcess] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self.premap: list[str] = []  # DRAM entry directories idle processes keep mapped
        # the load specs of the vLLM models idle processes build engines for, most recent first
        self.prebuilds: list[dict[str, Any]] = []
        self._held: dict[int, str] = {}  # idle process (pid) -> entry it was asked to build

    async def set_premap(self, entries: list[str]) -> None:
        """Tell the idle processes which DRAM images to keep mapped (``runtime.instance.
        premap``): a load of one of them then skips populating the mapping (~0.6-1 s/2 GB)."""
        if entries == self.premap:
            return
        self.premap = list(entries)
        for worker in list(self._idle):
            await self._send_premap(worker)

    async def _send_premap(self, worker: WorkerProcess) -> None:
        try:
            await worker.premap(self.premap)
        except Unavailable:
            pass
        except OSError as exc:  # a container's mounts: the load maps what it needs itself
            log.warning("premap of worker %s failed: %s", worker.pid, exc)

    async def set_prebuild(self, spec: dict[str, Any], room_bytes: int) -> None:
        """``spec`` is the latest vLLM load: the idle processes (and later ones) build engines
        while they wait (runtime/instance/worker.py), one per model the node served last, most
        recent first, as many models as the pool has processes. A load of one of those models
        then takes its engine as it is, one of the same configuration with its weights
        replaced (``take`` picks the process holding the load's entry).

        Only engines that fit in ``room_bytes`` (the node's memory that no instance and no
        DRAM tier was promised; each engine ``memory_bytes``, its weights and KV cache) are
        built: the least recent models give way first; when not even one engine per process
        of the latest fits, the idle processes free the ones they hold."""
        entry = _entry(spec)
        recent = [dict(spec)] + [s for s in self.prebuilds if _entry(s) != entry]
        await self._fit(recent, room_bytes)

    async def fit_prebuild(self, room_bytes: int) -> None:
        """Free the idle processes' warm engines that no longer fit in ``room_bytes`` (an
        instance was started since they were built), the least recent model's first."""
        await self._fit(self.prebuilds, room_bytes)

    async def _fit(self, recent: list[dict[str, Any]], room_bytes: int) -> None:
        candidates = recent[: self._slots]
        kept = list(candidates)
        while kept and sum(int(s.get("memory_bytes", 0)) for s in self._spread(kept)) > room_bytes:
            kept.pop()
        if len(kept) < len(candidates):
            log.info(
                "no warm engine for %s: it does not fit beside the %d more recent in the %d MiB "
                "that no instance or cache holds (one engine per idle process)",
                ", ".join(str(s.get("function")) for s in candidates[len(kept) :]), len(kept),
                max(room_bytes, 0) >> 20,
            )  # fmt: skip
        self.prebuilds = kept
        await self._assign()

    @property
    def _target(self) -> int:
        """The processes to keep: ``size``, and the spares once ``size`` of them are idle."""
        return self.size + (self.spare if len(self._idle) >= self.size else 0)

    @property
    def _slots(self) -> int:
        """Warm engines the pool plans for: one per process, at least one."""
        return max(self.size, 1)

    def _spread(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The spec each of the pool's processes holds an engine for: one per model of
        ``specs``, the most recent one for the processes left over."""
        n = self._slots
        return specs[:n] + specs[:1] * (n - len(specs)) if specs else []

    async def _assign(self) -> None:
        """Send each idle process the ``prebuild`` line of the engine it should hold, or
        ``release`` when it should hold none; a process already holding a wanted engine keeps
        it (a rebuild would cost seconds of CPU)."""
        wanted = [_entry(s) for s in self._spread(self.prebuilds)]
        specs = {_entry(s): s for s in self.prebuilds}
        unplaced = []
        for worker in list(self._idle):
            held = self._held.get(worker.pid)
            if held is not None and held in wanted:
                wanted.remove(held)
            else:
                unplaced.append(worker)
        # a wanted engine goes to a process that holds an unwanted one before a process that
        # holds none: the processes left over (the spares) stay without an engine
        unplaced.sort(key=lambda worker: worker.pid not in self._held)
        for worker in unplaced:
            entry = wanted.pop(0) if wanted else None
            if worker not in self._idle or (entry is None and worker.pid not in self._held):
                continue  # taken by a load meanwhile: its next line must be the load's
            line = {"cmd": "prebuild", "spec": specs[entry]} if entry else {"cmd": "release"}
            try:
                await worker.send(line)
            except Unavailable:
                continue
            if entry is None:
                self._held.pop(worker.pid, None)
            else:
                self._held[worker.pid] = entry

    def replenish(self) -> None:
        while (
            not self._closed
            and (self.start_error is None or self.backend != "vllm")
            and len(self._idle) + len(self._starting) < self._target
        ):
            task = asyncio.create_task(self._add())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _add(self) -> None:
        try:
            worker = await self.launcher.spawn(background=True)
        except Exception as exc:
            log.warning("pre-starting an instance process failed: %s", exc)
            return
        try:
            await worker.wait_idle(self.start_timeout_s)
        except BaseException as exc:
            worker.kill()  # cancelled by close() while it started, too: it must not outlive us
            if not isinstance(exc, Exception):
                raise
            self.start_error = str(exc)
            log.warning("pre-starting an instance process failed: %s", exc)
            return
        if self._closed:
            worker.kill()
            return
        if self.premap:
            await self._send_premap(worker)
        self.idle_line = self.idle_line or worker.idle
        self._idle.append(worker)
        await self._assign()
        if self.spare and len(self._idle) >= self.size:  # the spares, once the others are idle
            self._starting.discard(asyncio.current_task())  # this one: idle, not starting
            self.replenish()

    async def probe(self) -> dict[str, Any]:
        """The idle line of this pool's processes (a vLLM one names what that vLLM supports);
        when none has started yet, starts one (kept idle for the next load). Unavailable if
        the process cannot start (the backend's imports fail)."""
        if self.idle_line is None:
            if self.start_error is not None:
                raise Unavailable(self.start_error)
            try:
                worker, _ = await self.take()
            except Unavailable as exc:
                self.start_error = exc.message
                raise
            worker.background()  # idle again
            self._idle.insert(0, worker)
        assert self.idle_line is not None
        return self.idle_line

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def take(self, entry: str = "") -> tuple[WorkerProcess, bool]:
        """An idle process for a load of the DRAM entry ``entry`` and whether it came
        pre-started from the pool: the one holding that entry's warm engine, else one holding
        none, else the one holding the least recent model's (``set_prebuild``). When the pool
        is empty but refilling, waits for that process rather than starting a second one."""
        while True:
            while self._idle:
                worker = self._idle.pop(self._choose(entry))
                self._held.pop(worker.pid, None)
                if worker.alive():
                    worker.foreground()
                    return worker, True
            if not self._starting:
                break
            await asyncio.wait(set(self._starting), return_when=asyncio.FIRST_COMPLETED)
        worker = await self.launcher.spawn()
        try:
            await worker.wait_idle(self.start_timeout_s)
        except BaseException:
            worker.kill()
            raise
        self.idle_line = self.idle_line or worker.idle
        return worker, False

    def _choose(self, entry: str) -> int:
        """The index in ``_idle`` of the process ``take`` hands out for ``entry``: the lowest
        rank, from holding ``entry``'s engine, none, an unwanted one, to the most recent's."""
        order = [_entry(s) for s in self.prebuilds]

        def rank(i: int) -> int:
            held = self._held.get(self._idle[i].pid)
            if held is None:
                return -1  # no engine to free before the load builds its own
            if held == entry:
                return -2
            return len(order) - order.index(held) if held in order else 0

        return min(range(len(self._idle)), key=rank)

    async def close(self) -> None:
        self._closed = True
        starting = list(self._starting)
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        for worker in self._idle:
            worker.kill()
        for worker in self._idle:
            await worker.wait()
        self._idle.clear()
