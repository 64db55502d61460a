"""The vLLM backend: vLLM's engine (``LLMEngine`` with its engine core in this process, no
extra processes) driven by one thread of the instance, behind the same ``Backend`` port as the
transformers engine.

The thread owns the engine: each turn it adds the submitted requests, aborts the cancelled
ones and runs one ``step`` (vLLM's scheduler: continuous batching, chunked prefill, prefix
caching, paged KV cache), then hands each request its new tokens. Text is released by sllm's
own ``TextStream`` (the same detokenization and stop-string rules as the transformers backend),
so a request's exported state (prompt ids, output ids, released characters) means the same on
both backends, and live migration continues a stream exactly where it stopped.
"""

from __future__ import annotations

import gc
import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from runtime.backend.base import Staging
from runtime.engine.detokenize import TextStream
from runtime.engine.request import (
    Admitted,
    EngineLoad,
    ErrorEvent,
    FinishEvent,
    RequestState,
    Sink,
    TokenEvent,
    check_runnable,
    deliver,
)
from sllm.errors import Conflict, SllmError, Unavailable

log = logging.getLogger(__name__)


@dataclass
class _Active(Admitted):
    internal: bool = False  # a migration staging prefill: not a client's request


class VllmBackend:
    """``build`` makes the engine (a ``vllm.v1.engine.llm_engine.LLMEngine`` in this process);
    ``start`` runs it on the backend's thread, which then owns the engine: vLLM's CPU kernels
    size their work by the OpenMP threads of the thread that runs them, so the engine is built
    and stepped on one thread. ``decode`` renders token ids (the model's tokenizer).
    ``max_context`` is the engine's ``max_model_len``, ``block_size`` its KV block size
    (prefix caching reuses whole blocks)."""

    name = "vllm"

    def __init__(
        self,
        build: Callable[[], Any],
        decode: Callable[[Sequence[int]], str],
        *,
        eos_ids: Sequence[int],
    ) -> None:
        self._build = build
        self.engine: Any = None
        self._decode = decode
        self.eos_ids = frozenset(eos_ids)
        self.max_context = 0
        self.vocab_size = 0
        self.block_size = 0
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._cv = threading.Condition()
        self._pending: list[_Active] = []
        self._cancels: set[str] = set()
        self._active: dict[str, _Active] = {}  # added to the engine, engine thread only
        self._known: dict[str, _Active] = {}  # pending or active, under the lock
        self._calls: list[tuple[Callable[[Any], Any], Future[Any]]] = []
        self._pooling: dict[str, Future[list[float]]] = {}  # embeddings, engine thread only
        self._cancelled = 0
        self._stopping = False
        self._stop_reason = "instance is stopping"
        self._thread: threading.Thread | None = None
        self.kv_lease: Any = None  # runtime.backend.vllm_kv.KvLease of a CPU build

    # -- Backend, any thread ----------------------------------------------------------------
    def start(self) -> None:
        """Build the engine on the backend's thread and serve from there; returns once it is
        built (raising what the build raised)."""
        self._thread = threading.Thread(target=self._main, name="sllm-vllm", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    def stop(self, reason: str = "instance is stopping") -> None:
        with self._cv:
            self._stopping = True
            self._stop_reason = reason
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def close(self, reason: str, *, thorough: bool = True) -> None:
        """``stop``, then free the engine's memory now (weights, KV cache), for an engine
        replaced in a process that goes on: a stopped engine still referenced kept it all
        while the next one was built (SmolLM2: build 7.1-8.2 s beside it, 2.4-3.8 s after
        freeing it, which took 1.0-1.1 s; measured) and for the rest of the process's life.

        Dropping the engine runs vLLM's shutdown (a finalizer on its engine client): it
        unfreezes the heap and collects it in full twice, which frees the weights and the
        KV cache (1.1B: 2.25 GB, measured). ``thorough`` adds a third full collection for the
        few cycles left (1630 objects, 8 MiB there), 0.35 s of walking every import-time
        object again: a load that replaces an engine (``open_vllm``) skips it, and those
        objects wait, frozen, for the next engine's shutdown to unfreeze and collect them.
        When the engine outlived its reference (a cycle vLLM did not break), the collection
        runs anyway: only it would free the memory."""
        self.stop(reason)
        if self._thread is not None and self._thread.is_alive():
            log.warning("vLLM engine thread still running after stop: its memory stays held")
            return
        engine = weakref.ref(self.engine) if self.engine is not None else None
        self.engine = None
        if thorough or (engine is not None and engine() is not None):
            gc.collect()
        # vLLM's shutdown unfroze the whole heap (EngineCore.shutdown: gc.unfreeze), so every
        # full collection after it, the next build's own among them, walked each import-time
        # object again (~690k here, 0.28 s a collection, measured): freeze what survived, as
        # the idle process froze it after its imports (runtime.backend.vllm_process)
        gc.freeze()
        if self.kv_lease is not None:  # the KV cache memory lent to it: the next build's
            from runtime.backend.vllm_kv import ARENA

            ARENA.release(self.kv_lease)

    def submit(self, state: RequestState, sink: Sink, *, internal: bool = False) -> None:
        check_runnable(state, self.max_context, self.vocab_size)
        text = TextStream(self._decode, state.params.stop, state.output_ids, state.emitted_chars)
        active = _Active(state, sink, text, internal)
        with self._cv:
            if self._stopping:
                raise Unavailable("instance is stopping")
            if state.request_id in self._known:
                raise Conflict(f"request {state.request_id!r} is already running")
            self._known[state.request_id] = active
            self._pending.append(active)
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            if request_id in self._known:
                self._cancels.add(request_id)
                self._cv.notify_all()

    @property
    def cancelled(self) -> int:
        with self._cv:
            return self._cancelled

    def load(self) -> EngineLoad:
        with self._cv:
            return EngineLoad.of(a.state for a in self._known.values() if not a.internal)

    def snapshot(self, request_id: str) -> dict[str, Any] | None:
        return next((s for s in self.snapshots() if s["request_id"] == request_id), None)

    def snapshots(self) -> list[dict[str, Any]]:
        with self._cv:
            return [a.state.export() for a in self._known.values() if not a.internal]

    def call(self, fn: Callable[[Any], Any], timeout_s: float = 300.0) -> Any:
        """Run ``fn(engine)`` on the backend's thread between two steps; its result (or
        exception). For work on the engine itself (replacing its weights)."""
        done: Future[Any] = Future()
        with self._cv:
            if self._stopping:
                raise Unavailable("instance is stopping")
            self._calls.append((fn, done))
            self._cv.notify_all()
        return done.result(timeout_s)

    def embed(self, prompts: list[list[int]], timeout_s: float = 300.0) -> list[list[float]]:
        """Embeddings from an engine built for pooling (``VllmOptions.task`` "embed")."""
        from vllm import PoolingParams

        futures: list[Future[list[float]]] = []

        def add(engine: Any) -> None:  # on the engine thread
            for ids in prompts:
                rid = f"embed-{uuid.uuid4().hex}"
                futures.append(self._pooling.setdefault(rid, Future()))
                engine.add_request(rid, {"prompt_token_ids": ids}, PoolingParams(task="embed"))

        self.call(add)
        return [f.result(timeout_s) for f in futures]

    def new_stager(self, now: Callable[[], float]) -> Staging:
        from runtime.backend.vllm_staging import VllmStager

        return VllmStager(self, now)

    # -- engine thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self._build()
            config = self.engine.vllm_config
            self.max_context = int(config.model_config.max_model_len)
            self.vocab_size = int(config.model_config.get_vocab_size())
            self.block_size = int(config.cache_config.block_size)
        except BaseException as exc:
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._run()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (
                    self._pending or self._active or self._calls or self._pooling or self._stopping
                ):
                    self._cv.wait()
                if self._stopping:
                    break
                admitted, self._pending = self._pending, []
                cancels, self._cancels = self._cancels, set()
                calls, self._calls = self._calls, []
            for fn, done in calls:
                try:
                    done.set_result(fn(self.engine))
                except BaseException as exc:
                    done.set_exception(exc)
            for a in admitted:
                self._add(a)
            self._apply_cancels(cancels)
            if not (self._active or self._pooling):
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails the running requests, not the loop
                log.exception("vLLM engine step failed")
                message = f"generation failed: {type(exc).__name__}: {exc}"
                self._fail(list(self._active.values()), "engine_error", message)
                for future in self._pooling.values():
                    future.set_exception(SllmError(message, code="engine_error"))
                self._pooling.clear()
                continue
            for output in outputs:
                owner = self._active.get(output.request_id)
                if owner is not None:
                    self._on_output(owner, output)
                elif output.request_id in self._pooling and output.finished:
                    vector = [float(v) for v in output.outputs.data.tolist()]
                    self._pooling.pop(output.request_id).set_result(vector)
        self._abort_all()

    def _add(self, a: _Active) -> None:
        from runtime.backend.vllm_params import to_vllm

        state = a.state
        try:
            self.engine.add_request(
                state.request_id,
                {"prompt_token_ids": state.prompt_ids + state.output_ids},
                to_vllm(state.params, len(state.output_ids)),
            )
        except Exception as exc:  # vLLM refused the request (its own validation)
            self._fail([a], "invalid_input", f"{type(exc).__name__}: {exc}")
            return
        self._active[state.request_id] = a

    def _apply_cancels(self, cancels: set[str]) -> None:
        if not cancels:
            return
        with self._cv:
            queued = [a for a in self._pending if a.state.request_id in cancels]
            self._pending = [a for a in self._pending if a.state.request_id not in cancels]
        running = [self._active[rid] for rid in cancels if rid in self._active]
        if running:
            self.engine.abort_request([a.state.request_id for a in running])
        for a in [*queued, *running]:
            self._finish(a, "cancelled")

    def _on_output(self, a: _Active, output: Any) -> None:
        """New tokens of one request (DELTA outputs: only this step's tokens)."""
        completion = output.outputs[0]
        state = a.state
        reason: str | None = None
        logprobs = None
        if state.params.logprobs is not None:
            from runtime.backend.vllm_params import logprob_entries

            logprobs = logprob_entries(
                completion.logprobs, list(completion.token_ids), state.params.logprobs,
                lambda t: self._decode([t]),
            )  # fmt: skip
        for i, token in enumerate(completion.token_ids):
            if token in self.eos_ids and not state.params.ignore_eos:
                delta = ""
                reason = "stop"
            else:
                delta = a.text.push(int(token))
                if a.text.stopped:
                    reason = "stop"
            with self._cv:  # token and released text change together for ``snapshots``
                state.output_ids.append(int(token))
                state.emitted_chars = a.text.emitted
            if reason is None and output.finished and token == completion.token_ids[-1]:
                reason = _FINISH.get(str(completion.finish_reason), "stop")
            if reason is not None:
                delta += a.text.flush()
                with self._cv:
                    state.emitted_chars = a.text.emitted
            deliver(
                a.sink, TokenEvent(delta, [int(token)], logprobs[i : i + 1] if logprobs else None)
            )
            if reason is not None:
                break
        if reason is None and output.finished:  # finished without a token (aborted by vLLM)
            reason = _FINISH.get(str(completion.finish_reason), "stop")
        if reason is not None:
            if not output.finished:  # a stop string sllm saw first: vLLM still runs it
                self.engine.abort_request([state.request_id])
            self._finish(a, reason)

    def _finish(self, a: _Active, reason: str) -> None:
        state = a.state
        state.finish_reason = reason
        self._active.pop(state.request_id, None)
        with self._cv:
            self._known.pop(state.request_id, None)
            self._cancelled += reason == "cancelled"
        deliver(a.sink, FinishEvent(reason, len(state.prompt_ids), len(state.output_ids)))

    def _fail(self, victims: list[_Active], code: str, message: str) -> None:
        ids = [a.state.request_id for a in victims if a.state.request_id in self._active]
        if ids:
            try:
                self.engine.abort_request(ids)
            except Exception:
                log.debug("abort after a failed step failed", exc_info=True)
        for a in victims:
            a.state.finish_reason = "error"
            self._active.pop(a.state.request_id, None)
            with self._cv:
                self._known.pop(a.state.request_id, None)
            deliver(a.sink, ErrorEvent(code, message))

    def _abort_all(self) -> None:
        with self._cv:
            victims = list(self._known.values())
            self._pending = []
            calls, self._calls = self._calls, []
        for _, done in calls:
            done.set_exception(Unavailable(self._stop_reason))
        for future in self._pooling.values():
            future.set_exception(Unavailable(self._stop_reason))
        self._pooling.clear()
        self._fail(victims, "unavailable", self._stop_reason)


# vLLM's finish reasons -> the Instance API's ("abort" only when vLLM itself gave up).
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}
