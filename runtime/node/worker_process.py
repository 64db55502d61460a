"""One instance process as the node sees it, and the pool of pre-started ones.

The process (``runtime.instance.worker``) speaks JSON lines: the node writes commands to its
stdin, it answers on stdout (idle, ready, failed, stopped); its stderr is forwarded line by line
to ``on_log``. A pre-started process has already imported and warmed torch and transformers
(~2.5-4 s here), so taking one from the pool removes that from the cold-start path.

The seam between the supervisor and how an instance is started and reached is
``runtime.node.instance_backend.InstanceBackend``: its ``ProcessBackend``, or
``runtime.container.backend``'s ``ContainerBackend`` (each instance in its own container, a
pool per image). Both hand out ``WorkerProcess`` objects; a container's worker overrides the
hooks (``attach``, ``premap``, ``kill``) that differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sllm.errors import Unavailable
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

LogSink = Callable[[str], None]
# Control lines (ready carries timings) are small; 1 MiB bounds a misbehaving process.
_LINE_LIMIT = 1 << 20


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, started: float) -> None:
        self.proc = proc
        self.started = started
        self.startup_s = 0.0
        self.idle: dict[str, Any] = {}  # its idle line (a vLLM process says what it supports)
        self.nice = 0  # how far below the node's priority it runs (runtime.node.priority)
        self.on_log: LogSink = lambda line: log.info("worker %s: %s", proc.pid, line)
        self._pump = asyncio.create_task(self._pump_stderr())

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- hooks a container worker overrides ---------------------------------------------------
    async def attach(self, entry: Path, record: FunctionRecord, threads: int) -> str:
        """Give the process its DRAM entry (and limits) before the load line; returns the
        entry directory as the process sees it. A child process sees the node's files."""
        return str(entry)

    def handler_dir(self, default: Path) -> str:
        """Where the process writes a custom handler's files ("": a scratch directory of
        its own)."""
        return str(default)

    async def premap(self, entries: list[str]) -> None:
        """Tell an idle process which DRAM entries (node paths) to keep mapped."""
        await self.send({"cmd": "premap", "entries": entries})

    def node_pid(self) -> int:
        """The process's pid as the node sees it (a container's worker: its host pid)."""
        return self.proc.pid

    def foreground(self) -> None:
        """Bring a process started at background priority back to the node's own, every
        thread of it (``runtime.node.priority``); it is about to load and serve."""
        if self.nice == 0:
            return
        from runtime.node.priority import set_nice

        try:
            set_nice(self.node_pid(), os.getpriority(os.PRIO_PROCESS, 0))
        except OSError as exc:
            log.warning("instance process %s stays at nice %d: %s", self.pid, self.nice, exc)
            return
        self.nice = 0

    def background(self) -> None:
        """Back to background priority: an idle process returned to its pool."""
        from runtime.node.priority import idle_nice, set_nice

        nice = idle_nice()
        if self.nice or not nice:
            return
        try:
            set_nice(self.node_pid(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError as exc:
            log.warning("instance process %s stays at the node's priority: %s", self.pid, exc)
            return
        self.nice = nice

    @property
    def exit_detail(self) -> str:
        """Why the process ended, when more is known than its exit code ("" otherwise)."""
        return ""

    async def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            try:
                raw = await self.proc.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            try:
                self.on_log(line)
            except Exception:
                log.debug("log sink failed", exc_info=True)

    async def next_event(self, timeout_s: float | None) -> dict[str, Any]:
        """The next control message; Unavailable if the process exits or stays silent for
        ``timeout_s`` (None: however long)."""
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"instance process {self.pid} sent nothing for {timeout_s}s"
            ) from None
        if not raw:
            code = await self.proc.wait()
            raise Unavailable(f"instance process {self.pid} exited with code {code}")
        try:
            message: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError:
            raise Unavailable(f"instance process {self.pid} sent a garbled line") from None
        return message

    async def wait_idle(self, timeout_s: float = 180.0) -> None:
        message = await self.next_event(timeout_s)
        if message.get("event") != "idle":
            raise Unavailable(f"instance process {self.pid} did not start: {message}")
        self.startup_s = float(message.get("startup_s", 0.0))
        self.idle = message

    async def send(self, message: dict[str, Any]) -> None:
        if self.proc.stdin is None or self.proc.stdin.is_closing():
            raise Unavailable(f"instance process {self.pid} is gone")
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()

    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait(self) -> int:
        code = await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pump, 2.0)
        return code


class Launcher(Protocol):
    """Starts one instance process (it still has to say ``idle``); ``background``: at
    ``runtime.node.priority.idle_nice()`` (a pool refill), else at the node's priority."""

    async def spawn(self, background: bool = False) -> WorkerProcess: ...


class ProcessLauncher:
    """``python -m runtime.instance.worker`` as a child of the node, in the node's
    environment plus ``env``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    async def spawn(self, background: bool = False) -> WorkerProcess:
        from runtime.node.priority import ENV, idle_nice

        started = time.monotonic()
        nice = idle_nice() if background else 0
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "runtime.instance.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env, ENV: str(nice)},
            limit=_LINE_LIMIT,
            start_new_session=True,  # a Ctrl-C to the node does not hit instances first
        )
        worker = WorkerProcess(proc, started)
        worker.nice = nice
        return worker


def _entry(spec: dict[str, Any]) -> str:
    """The DRAM entry directory a load spec maps: what tells models apart in the pool."""
    return str(spec.get("entry_dir", ""))


class WorkerPool:
    """Keeps ``size`` idle pre-started processes of one backend. ``take`` hands one out
    (starting a fresh one when the pool is empty or ``size`` is 0); ``replenish`` refills in
    the background. The supervisor replenishes after a load finished: a process starting while
    another loads would compete for the same cores (2 here) and slow the cold start it is
    meant to speed. ``backend`` "vllm": the processes import vLLM (``SLLM_WORKER_BACKEND``).
    """

    def __init__(self, size: int, launcher: Launcher, backend: str = "transformers") -> None:
        self.size = size
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
            and len(self._idle) + len(self._starting) < self.size
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
