"""The instance process: ``python -m runtime.instance.worker``.

Started by the node ahead of need (the pre-started pool): it imports torch, transformers and
uvicorn and warms them up, says ``idle`` and waits for one ``load`` line on stdin. Then it loads the
model (``load_instance``), serves the Instance HTTP API on a free port of ``spec.host`` and
says ``ready``, then ``quiet`` once its first request was answered (the node refills its
pool then, not beside that request); a later ``drain`` line drains and exits. stdin closing means the node died:
the requests in flight may still finish (up to ``ORPHAN_DRAIN_S``, new ones get 503), then
it exits; control lines it can no longer send are dropped.

Control messages to the node are JSON lines on the process's original stdout; everything the
process or a custom handler prints goes to stderr, which the node forwards as log lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

_control: IO[str] | None = None
# The node died (our stdin closed): in-flight requests may finish for this long, new ones are
# refused (503), then the process exits; an orphan must not hold its device much longer.
ORPHAN_DRAIN_S = 10.0


def send(message: dict[str, Any]) -> None:
    """A control line to the node. When the node is gone (its end of the pipe is closed)
    there is nobody to tell: the line is dropped, and the requests in flight go on."""
    global _control
    if _control is None:
        return
    try:
        _control.write(json.dumps(message) + "\n")
        _control.flush()
    except (BrokenPipeError, OSError):
        _control = None


def _take_stdout() -> IO[str]:
    """Keep the real stdout for control lines and point fd 1 at stderr, so prints of user code
    can never be mistaken for control messages."""
    control = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return control


def _server_config(app: Any) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)


def server_warm_up() -> None:
    """Import uvicorn and load the protocol modules its server picks (``Config.load``) while
    the process is idle. Done after the model was loaded, this took 0.54-0.64 s between the
    model and ``ready`` here (load average 6.5), against 0.01-0.03 s once warmed."""

    async def nothing(scope: Any, receive: Any, send: Any) -> None:
        return None

    _server_config(nothing).load()


def _server(config: uvicorn.Config, up: asyncio.Event) -> uvicorn.Server:
    """A uvicorn server that sets ``up`` once its start-up is over (listening, or failed: see
    ``started``). Polling ``started`` every 10 ms cost 12 ms of the 36 ms DRAM-hit ``ready``
    here."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets)
            finally:
                up.set()

    return Server(config)


class FirstAnswer:
    """ASGI wrapper whose ``answered`` is set once a request (not ``/healthz``) was answered
    and no other is in flight: the instance then says ``quiet`` and the node refills its pool,
    which slowed the first request when it ran beside it (``Supervisor._follow``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.active = 0
        self.answered = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.answered.is_set() or scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)  # said once: nothing left to count
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if not self.active:
                self.answered.set()


async def _say_quiet(first: FirstAnswer) -> None:
    await first.answered.wait()
    send({"event": "quiet"})


async def _serve(loaded: Any, host: str, secret: str) -> int:
    from runtime.instance.server import build_app
    from sllm.instance_auth import RequireSecret

    service = loaded.service
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    first = FirstAnswer(build_app(service))
    app = RequireSecret(first, secret, service.instance_id)
    started = asyncio.Event()
    server = _server(_server_config(app), started)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    up = asyncio.ensure_future(started.wait())
    await asyncio.wait({up, serving}, return_when=asyncio.FIRST_COMPLETED)
    if not server.started:  # the start failed: uvicorn logged why
        up.cancel()
        await serving
        return 1
    service.state = "ready"
    loaded.timings["serve_s"] = time.monotonic() - t0
    send({"event": "ready", "port": port, "timings": loaded.timings, "engine": loaded.engine})
    quiet = asyncio.create_task(_say_quiet(first))
    drain_s = await _wait_for_drain(serving)
    quiet.cancel()
    service.state = "draining"  # from here new requests get 503
    send({"event": "draining"})
    drained = await service.drain(drain_s)
    service.engine.stop("instance stopped before the request finished")
    server.should_exit = True
    await serving
    send({"event": "stopped", "drained": drained})
    return 0


async def _wait_for_drain(serving: asyncio.Task[None]) -> float:
    """Wait for a ``drain`` line on stdin (its deadline), stdin closing (the node died:
    ``ORPHAN_DRAIN_S``) or the server ending (0 s). stdin is read on a daemon thread: a
    blocked read must not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read, name="sllm-control", daemon=True).start()
    while True:
        getter = asyncio.ensure_future(lines.get())
        await asyncio.wait({getter, serving}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            return 0.0
        line = getter.result()
        if not line:  # the node is gone: finish what runs, then stop
            return ORPHAN_DRAIN_S
        try:
            command = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(command, dict) and command.get("cmd") == "drain":
            return float(command.get("drain_s", 30.0))


class Idle:
    """What an idle process prepares while it waits: DRAM images mapped (``premap`` lines)
    and, in a vLLM process, an engine built for the model the node expects next
    (``prebuild`` lines: the load spec of the latest vLLM instance it started)."""

    def __init__(self, *, vllm: bool) -> None:
        from runtime.instance.premap import Premapper

        self.vllm = vllm
        # a transformers process also builds each entry's CPU model over its mapping, a vLLM
        # one loads vLLM's tokenizer of each entry for the next engine build
        self.premapper = Premapper(build_models=not vllm, engine_tokenizers=vllm)
        self.warm: Any = None  # runtime.backend.vllm_build.WarmEngine

    def prebuild(self, raw: object) -> None:
        from runtime.instance.load_spec import LoadSpec
        from runtime.instance.loading import prebuild_vllm

        if not isinstance(raw, dict) or not self.vllm:
            return
        spec = LoadSpec.from_json(raw)
        if self.warm is not None and self.warm.entry == spec.entry_dir:
            return
        if self.warm is not None:
            self.warm.backend.close("replaced by another prebuild")
            self.warm = None
        try:
            self.warm = prebuild_vllm(spec, self.premapper.images.get(spec.entry_dir))
        except Exception:  # a hint only: the load builds what it needs
            logging.getLogger(__name__).exception("prebuilding a vLLM engine failed")
            return
        logging.getLogger(__name__).info(
            "prebuilt a vLLM engine for %s (key %s)", spec.entry_dir, self.warm.key
        )

    def release(self) -> None:
        """The node needs the memory (``release`` line): free the warm engine and the KV cache
        memory this process keeps for its builds."""
        if self.warm is None:
            return
        from runtime.backend.vllm_kv import ARENA

        self.warm.backend.close("released: the node needs its memory")
        self.warm = None
        freed = ARENA.free()
        logging.getLogger(__name__).info(
            "released the warm vLLM engine and %d MiB of KV cache memory", freed >> 20
        )

    def wait_for_load(self) -> dict[str, Any] | None:
        """Apply ``premap``, ``prebuild`` and ``release`` lines until the ``load`` line
        (None: stdin closed)."""
        for line in sys.stdin:
            try:
                command = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(command, dict):
                continue
            if command.get("cmd") == "premap":
                self.premapper.update([str(e) for e in command.get("entries", [])])
            elif command.get("cmd") == "prebuild":
                self.prebuild(command.get("spec"))
            elif command.get("cmd") == "release":
                self.release()
            elif command.get("cmd") == "load":
                return command
        return None


def main() -> int:
    global _control
    # a pool process waits at background priority (runtime.node.priority): set before the
    # imports, so every thread started from here on inherits it; the node restores it on load
    from runtime.node.priority import ENV, idle_policy, omp_spin  # the standard library only

    backend = os.environ.get("SLLM_WORKER_BACKEND", "")
    omp_spin(os.environ, backend)  # read when torch loads
    nice = int(os.environ.get(ENV) or 0)
    if nice > 0:
        os.nice(nice)
        idle_policy()
    _control = _take_stdout()
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    started = time.monotonic()
    from runtime.instance.load_spec import LoadSpec
    from runtime.instance.loading import load_instance, pool_warm_up

    threads = int(os.environ.get("SLLM_INSTANCE_THREADS", "0") or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    idle_line: dict[str, Any] = {"event": "idle", "pid": os.getpid()}
    if backend == "vllm":
        from runtime.backend.vllm_process import pool_warm_up as vllm_warm_up

        idle_line["vllm"] = vllm_warm_up()
    else:
        pool_warm_up()
    server_warm_up()
    send({**idle_line, "startup_s": time.monotonic() - started})

    idle = Idle(vllm=backend == "vllm")
    command = idle.wait_for_load()
    if command is None:
        return 0
    try:
        spec = LoadSpec.from_json(command)
        if not spec.secret:
            raise ValueError("the load command has no instance secret; refusing to serve")
        # the warm engine goes to the load: kept, reloaded, or closed there for another model
        warm, idle.warm = idle.warm, None
        t0 = time.monotonic()
        loaded = load_instance(spec, idle.premapper.take(spec.entry_dir), warm)
        loaded.timings["load_instance_s"] = time.monotonic() - t0
        del warm
    except Exception as exc:
        from sllm.errors import SllmError

        code = exc.code if isinstance(exc, SllmError) else "load_failed"
        message = str(exc) if isinstance(exc, SllmError) else f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
        send({"event": "failed", "code": code, "error": message})
        return 1
    return asyncio.run(_serve(loaded, spec.host, spec.secret))


if __name__ == "__main__":
    code = main()
    # Every request is answered and every control line sent: skip the interpreter's teardown
    # of torch and transformers (1-2 s on a busy 2-core machine), which would only delay the
    # node freeing the device. The kernel unmaps the shared-memory images.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
