"""Target side of a live migration: recompute the KV cache of imported requests ahead of their
resume, while the source keeps decoding them.

Each round brings a request's tokens so far (prompt + output). Only the tokens not yet staged
are run through the model, on top of the cache of the previous round; the newest token is left
out, because the engine runs it at resume to get the logits of the next draw. After each round
the cache is offered to the engine (``Engine.staged``), which takes it when the request is
resumed there, so a resume computes only the tokens of the final round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from runtime.engine.engine import Engine
from runtime.engine.forward import forward, new_cache
from runtime.engine.request import RequestState
from sllm.errors import InvalidInput

# A staged request not resumed within this long was abandoned (its migration failed on the
# source's side without an abort reaching us): its cache is dropped.
STAGED_TTL_S = 120.0


@dataclass
class _Staged:
    cache: Any
    covered: list[int]
    touched: float


class Stager:
    """Caches prefilled for requests that are about to be resumed on ``engine``'s model."""

    def __init__(self, engine: Engine, now: Callable[[], float]) -> None:
        self.engine = engine
        self._now = now
        self._lock = threading.Lock()  # one round at a time (two would race on one cache)
        self._staged: dict[str, _Staged] = {}

    def stage(self, states: list[dict[str, Any]]) -> dict[str, int]:
        """Prefill every exported request in ``states`` up to its newest token (blocking; run
        it in a thread). Returns request id -> tokens now covered by its cache."""
        parsed = [RequestState.from_export(s) for s in states]
        with self._lock, torch.no_grad():
            self._expire()
            return {state.request_id: self._stage_one(state) for state in parsed}

    def drop(self, request_ids: list[str]) -> int:
        """Forget staged requests (their migration was aborted); returns how many were known."""
        with self._lock:
            dropped = 0
            for rid in request_ids:
                self.engine.staged.pop(rid, None)
                dropped += self._staged.pop(rid, None) is not None
            return dropped

    def staged(self) -> dict[str, int]:
        with self._lock:
            return {rid: len(s.covered) for rid, s in self._staged.items()}

    def _stage_one(self, state: RequestState) -> int:
        ids = state.prompt_ids + state.output_ids
        goal = ids[:-1]  # the newest token is run at resume, giving the next logits
        entry = self._staged.pop(state.request_id, None)
        self.engine.staged.pop(state.request_id, None)  # not resumable while it grows
        if entry is None or goal[: len(entry.covered)] != entry.covered:
            entry = _Staged(new_cache(self.engine.model), [], 0.0)
        todo = goal[len(entry.covered) :]
        if todo:
            limit = self.engine.max_context
            if len(ids) >= limit:
                raise InvalidInput(f"request {state.request_id}: {len(ids)} tokens exceed {limit}")
            inputs = torch.tensor([todo], dtype=torch.long, device=self.engine.device)
            forward(self.engine.model, entry.cache, inputs)
            entry.covered = goal
        entry.touched = self._now()
        self._staged[state.request_id] = entry
        if entry.covered:
            self.engine.staged[state.request_id] = (entry.cache, list(entry.covered))
        return len(entry.covered)

    def _expire(self) -> None:
        """Drop entries the engine took (resumed) or that waited past ``STAGED_TTL_S``."""
        now = self._now()
        gone = [
            rid
            for rid, s in self._staged.items()
            if rid not in self.engine.staged or now - s.touched > STAGED_TTL_S
        ]
        for rid in gone:
            self._staged.pop(rid, None)
            self.engine.staged.pop(rid, None)
