"""The generation engine: continuous batching over a transformers causal LM.

One thread owns the model. Each turn of its loop it admits waiting requests (prefilling each
alone, which also samples its first token), then runs one decoding step for every running
sequence together (``KVBatch``) and hands each request its new token through its sink. New
requests join between steps; finished or cancelled ones leave between steps.

Chunked prefill: a prompt with more than ``prefill_chunk`` tokens left to compute is not
prefilled whole on admission (that would stall every running stream for the whole forward
pass) but over several turns, at most ``prefill_chunk`` tokens a turn across all such requests
(oldest first), with one decoding step of the running batch between turns. Its last chunk's
logits sample its first token and it joins the batch then. Until then it is active (it holds a
batch slot, ``snapshots`` export it with its prompt as its tokens so far, ``cancel`` ends it),
but not in ``KVBatch``.

Callers on other threads (the HTTP server's event loop, a custom handler's worker thread) only
``submit`` and ``cancel``; events come back through the thread-safe sink they passed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runtime.engine.detokenize import TextStream
from runtime.engine.forward import forward, new_cache
from runtime.engine.kv_batch import KVBatch, check_batchable
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
from runtime.engine.sampling import sample_token
from sllm.errors import Conflict, Unavailable

log = logging.getLogger(__name__)


@dataclass
class _Active(Admitted):
    next_input: int = -1
    cache: Any = None  # while prefilling: its own batch-1 cache, holding ``prefilled`` positions
    prefilled: int = 0


class Engine:
    """Continuous-batching generation over ``model`` (a transformers causal LM in eval mode).

    ``max_batch`` bounds the sequences decoded together (more wait their turn); ``max_context``
    bounds prompt plus output tokens (default: the model's ``max_position_embeddings``).
    ``prefill_chunk`` bounds the prompt tokens computed per loop turn for long prompts (see the
    module docstring); 0 prefills every prompt whole on admission.
    """

    def __init__(
        self,
        model: Any,
        decode: Callable[[Sequence[int]], str],
        *,
        eos_ids: Sequence[int] = (),
        max_batch: int = 16,
        max_context: int | None = None,
        prefill_chunk: int = 512,
    ) -> None:
        if prefill_chunk < 0:
            raise ValueError(
                f"prefill_chunk must be >= 0 (0 disables chunking), not {prefill_chunk}"
            )
        self.model = model
        check_batchable(new_cache(model), str(getattr(model.config, "model_type", "?")))
        self.device = next(model.parameters()).device
        self._decode = decode
        self.eos_ids = frozenset(eos_ids)
        self.max_batch = max_batch
        self.max_context = max_context or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        self._cv = threading.Condition()
        self._pending: list[_Active] = []
        self._cancels: set[str] = set()
        self._active: dict[str, _Active] = {}
        self._known: set[str] = set()  # ids pending or active (duplicate detection)
        self._batch = KVBatch()
        # 512 (vLLM's first chunked-prefill token budget): on a GPU such a chunk takes about as
        # long as one to a few decoding steps, so a running stream's largest pause stays a few
        # steps while the prompt is still computed in passes large enough to be efficient.
        self.prefill_chunk = prefill_chunk
        self._prefilling: list[_Active] = []  # engine thread only; admission order
        # Live migration (runtime.migration) prefills a request's cache here before the request
        # is resumed: request id -> (cache, the token ids it covers). Read once at admission.
        self.staged: dict[str, tuple[Any, list[int]]] = {}
        self._cancelled = 0  # requests ended by ``cancel`` since start
        self._stopping = False
        self._stop_reason = "instance is stopping"
        self._thread: threading.Thread | None = None

    # -- public, any thread ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sllm-engine", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "instance is stopping") -> None:
        """Fail whatever is still queued or running with ``unavailable`` and end the thread."""
        with self._cv:
            self._stopping = True
            self._stop_reason = reason
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, state: RequestState, sink: Sink) -> None:
        """Queue a request (a new one, or one resumed with ``output_ids`` already generated)."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        check_runnable(state, self.max_context, vocab)
        text = TextStream(self._decode, state.params.stop, state.output_ids, state.emitted_chars)
        with self._cv:
            if self._stopping:
                raise Unavailable("instance is stopping")
            if state.request_id in self._known:
                raise Conflict(f"request {state.request_id!r} is already running")
            self._known.add(state.request_id)
            self._pending.append(_Active(state, sink, text))
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        """Stop a request between steps (its sink gets a ``cancelled`` finish)."""
        with self._cv:
            if request_id in self._known:
                self._cancels.add(request_id)
                self._cv.notify_all()

    @property
    def cancelled(self) -> int:
        """Requests ended by ``cancel`` (a client that went away, a migration) since start."""
        with self._cv:
            return self._cancelled

    def load(self) -> EngineLoad:
        with self._cv:
            return EngineLoad.of(a.state for a in [*self._pending, *self._active.values()])

    def snapshot(self, request_id: str) -> dict[str, Any] | None:
        """The exportable state of an in-flight request (issue 7), or None if unknown."""
        return next((s for s in self.snapshots() if s["request_id"] == request_id), None)

    def snapshots(self) -> list[dict[str, Any]]:
        """Exportable states of every queued or running request, each consistent (taken
        under the lock the engine thread holds while it records a step)."""
        with self._cv:
            return [a.state.export() for a in [*self._pending, *self._active.values()]]

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._pending or self._active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    self._fail_all("unavailable", self._stop_reason)
                    return
                room = max(0, self.max_batch - len(self._active))
                admitted, self._pending = self._pending[:room], self._pending[room:]
                cancels, self._cancels = self._cancels, set()
                for a in admitted:
                    self._active[a.state.request_id] = a
            self._apply_cancels(cancels)
            for a in admitted:
                if a.state.request_id in self._active:
                    self._guarded(a, self._admit)
            self._prefill_chunks()
            if len(self._batch):
                try:
                    self._decode_step()
                except Exception as exc:
                    self._recover_batch(exc)

    def _apply_cancels(self, cancels: set[str]) -> None:
        if not cancels:
            return
        with self._cv:
            for a in list(self._pending):
                if a.state.request_id in cancels:
                    self._pending.remove(a)
                    self._finish(a, "cancelled")
        for rid in cancels & set(self._active):
            self._finish(self._active[rid], "cancelled")
        self._prefilling = [a for a in self._prefilling if a.state.request_id not in cancels]
        self._batch.remove(cancels)

    def _admit(self, a: _Active) -> None:
        """Prefill a newly admitted request whole, or queue it for chunks if it is long."""
        ids = a.state.prompt_ids + a.state.output_ids
        a.cache, a.prefilled = self._start_cache(a.state.request_id, ids)
        if self.prefill_chunk and len(ids) - a.prefilled > self.prefill_chunk:
            self._prefilling.append(a)
        else:
            self._prefill(a, ids, len(ids))

    def _guarded(self, a: _Active, step: Callable[[_Active], None]) -> None:
        """Run one request's own step (its prefill); an exception there (out of memory, a
        prompt the model cannot take) ends that request alone with an error."""
        try:
            step(a)
        except Exception as exc:
            log.warning("request %s failed: %s: %s", a.state.request_id, type(exc).__name__, exc)
            self._fail_one(a, exc)

    def _recover_batch(self, exc: Exception) -> None:
        """A batched decoding step failed: its cache may be half-grown, and the step alone
        does not say which row was at fault. Every row leaves the batch and is prefilled
        again from its tokens so far, alone (as a migrated request is resumed: the same
        tokens follow); a row that fails alone ends with the error, the others continue."""
        log.warning("decoding step of %d rows failed (%s: %s); prefilling each again alone",
                    len(self._batch), type(exc).__name__, exc)  # fmt: skip
        rows = [self._active[rid] for rid in self._batch.ids if rid in self._active]
        self._batch = KVBatch()
        for a in rows:
            a.cache, a.prefilled = None, 0
            self._guarded(a, self._readmit)

    def _readmit(self, a: _Active) -> None:
        ids = a.state.prompt_ids + a.state.output_ids
        a.cache = new_cache(self.model)
        self._prefill(a, ids, len(ids))

    def _prefill_chunks(self) -> None:
        """Advance the prefilling requests by ``prefill_chunk`` tokens in all, oldest first."""
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            a = self._prefilling[0]
            ids = a.state.prompt_ids + a.state.output_ids
            end = min(len(ids), a.prefilled + budget)
            budget -= end - a.prefilled
            if end == len(ids):
                self._prefilling.pop(0)
            try:
                self._prefill(a, ids, end)
            except Exception as exc:
                if a in self._prefilling:
                    self._prefilling.remove(a)
                log.warning("request %s failed: %s: %s",
                            a.state.request_id, type(exc).__name__, exc)  # fmt: skip
                self._fail_one(a, exc)

    def _prefill(self, a: _Active, ids: list[int], end: int) -> None:
        """Compute ``ids[a.prefilled:end]`` into ``a.cache``; at the end of ``ids``, sample the
        first token and join the batch."""
        inputs = torch.tensor([ids[a.prefilled : end]], dtype=torch.long, device=self.device)
        logits = forward(self.model, a.cache, inputs)
        a.prefilled = end
        if end < len(ids):
            return
        cache, a.cache = a.cache, None  # the batch owns it from here
        if self._accept(a, logits[0]):
            self._batch.join(a.state.request_id, cache, len(ids))

    def _start_cache(self, request_id: str, ids: list[int]) -> tuple[Any, int]:
        """(cache, positions it holds): one staged by live migration when it covers a proper
        prefix of ``ids`` (only the rest is computed now), else a new empty one."""
        staged = self.staged.pop(request_id, None)
        if staged is not None:
            cache, covered = staged
            if 0 < len(covered) < len(ids) and ids[: len(covered)] == covered:
                return cache, len(covered)
        return new_cache(self.model), 0

    def _decode_step(self) -> None:
        mask, positions = self._batch.step_inputs()
        rows = [self._active[rid] for rid in self._batch.ids]
        inputs = torch.tensor([[a.next_input] for a in rows], dtype=torch.long, device=self.device)
        step_logits = forward(
            self.model, self._batch.cache, inputs, attention_mask=mask, position_ids=positions
        )
        self._batch.commit_step(mask)
        # one device-to-host copy for the whole batch (the sampler works on CPU float32)
        logits = step_logits.to(device="cpu", dtype=torch.float32)
        finished = {
            a.state.request_id for i, a in enumerate(rows) if not self._accept(a, logits[i])
        }
        self._batch.remove(finished)

    def _accept(self, a: _Active, logits: torch.Tensor) -> bool:
        """Sample the next token of ``a``, emit it; False once the request has finished."""
        state = a.state
        token = sample_token(logits, state.params, state.steps)
        reason: str | None = None
        if token in self.eos_ids and not state.params.ignore_eos:
            reason, delta = "stop", ""
        else:
            delta = a.text.push(token)
            if a.text.stopped:
                reason = "stop"
        produced = len(state.output_ids) + 1
        if reason is None and (
            produced >= state.params.max_tokens
            or len(state.prompt_ids) + produced >= self.max_context
        ):
            reason = "length"
        if reason is not None:
            delta += a.text.flush()
        with self._cv:  # token and released text change together for ``snapshots``
            state.output_ids.append(token)
            state.emitted_chars = a.text.emitted
        a.next_input = token
        deliver(a.sink, TokenEvent(delta, [token]))
        if reason is None:
            return True
        self._finish(a, reason)
        return False

    def _finish(self, a: _Active, reason: str) -> None:
        state = a.state
        state.finish_reason = reason
        with self._cv:
            self._active.pop(state.request_id, None)
            self._known.discard(state.request_id)
            self._cancelled += reason == "cancelled"
        deliver(a.sink, FinishEvent(reason, len(state.prompt_ids), len(state.output_ids)))

    def _fail_one(self, a: _Active, exc: Exception) -> None:
        """End one request with ``engine_error`` (the others are untouched)."""
        a.cache = None
        with self._cv:
            self._active.pop(a.state.request_id, None)
            self._known.discard(a.state.request_id)
        a.state.finish_reason = "error"
        deliver(a.sink, ErrorEvent("engine_error", _failure(exc)))

    def _fail_all(self, code: str, message: str) -> None:
        with self._cv:
            victims = [*self._pending, *self._active.values()]
            self._pending, self._active, self._known = [], {}, set()
        self._batch = KVBatch()
        self._prefilling = []
        for a in victims:
            a.state.finish_reason = "error"
            deliver(a.sink, ErrorEvent(code, message))


def _failure(exc: Exception) -> str:
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "generation failed: out of memory for this request (try a shorter prompt)"
    return f"generation failed: {type(exc).__name__}: {exc}"
