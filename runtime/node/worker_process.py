"""One instance process as the node sees it, and how one is started (the pool of pre-started
ones is ``runtime.node.worker_pool``).

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
        if self.nice:
            self._renice(0)

    def background(self) -> None:
        """Back to background priority: an idle process returned to its pool."""
        from runtime.node.priority import idle_nice

        if not self.nice and idle_nice():
            self._renice(idle_nice())

    def _renice(self, nice: int) -> None:
        """Every thread at ``nice`` above the node's own; on failure it stays as it is."""
        from runtime.node.priority import set_nice

        try:
            set_nice(self.node_pid(), os.getpriority(os.PRIO_PROCESS, 0) + nice, idle=nice > 0)
        except OSError as exc:
            log.warning("instance process %s stays at nice +%d: %s", self.pid, self.nice, exc)
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
            # a Ctrl-C to the node does not hit instances first; the node's session (not a
            # new one, see runtime.node.priority), so that SCHED_IDLE yields to its instances
            process_group=0,
        )
        worker = WorkerProcess(proc, started)
        worker.nice = nice
        return worker
