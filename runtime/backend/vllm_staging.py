"""Target side of a live migration on the vLLM backend: each round prefills the request's
tokens so far (less the newest, which the resume runs to get the next logits) as a one-token
internal request, so vLLM's prefix cache holds their KV blocks; the resumed request (prompt +
output as its prompt) then finds them and computes only what came after the last round.

Only whole KV blocks are cached (``block_size`` tokens), so a round covers its tokens rounded
down to a block. Cached blocks are vLLM's to evict under memory pressure: a resume that finds
fewer of them computes more, with the same result.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runtime.engine.request import ErrorEvent, Event, FinishEvent, RequestState
from runtime.engine.sampling import SamplingParams
from sllm.errors import InvalidInput, SllmError

if TYPE_CHECKING:
    from runtime.backend.vllm_engine import VllmBackend

# A staging prefill is a prefill of at most the context length: a minute means a sick engine.
STAGE_TIMEOUT_S = 60.0


class VllmStager:
    def __init__(self, backend: VllmBackend, now: Callable[[], float]) -> None:
        self.backend = backend
        self._now = now
        self._lock = threading.Lock()
        self._staged: dict[str, int] = {}  # request id -> tokens covered

    def stage(self, states: list[dict[str, Any]]) -> dict[str, int]:
        parsed = [RequestState.from_export(s) for s in states]
        with self._lock:
            return {state.request_id: self._stage_one(state) for state in parsed}

    def drop(self, request_ids: list[str]) -> int:
        with self._lock:
            return sum(self._staged.pop(rid, None) is not None for rid in request_ids)

    def _stage_one(self, state: RequestState) -> int:
        goal = (state.prompt_ids + state.output_ids)[:-1]
        if len(goal) + 1 >= self.backend.max_context:
            raise InvalidInput(
                f"request {state.request_id}: {len(goal) + 1} tokens exceed "
                f"{self.backend.max_context}"
            )
        covered = len(goal) // self.backend.block_size * self.backend.block_size
        if covered > self._staged.get(state.request_id, 0):
            self._prefill(goal)
        self._staged[state.request_id] = covered
        return covered

    def _prefill(self, ids: list[int]) -> None:
        """Run ``ids`` as a one-token greedy request and wait for it (its blocks stay cached)."""
        events: queue.Queue[Event] = queue.Queue()
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        staging = RequestState(f"stage-{uuid.uuid4().hex}", ids, params)
        self.backend.submit(staging, events.put, internal=True)
        while True:
            try:
                event = events.get(timeout=STAGE_TIMEOUT_S)
            except queue.Empty:
                self.backend.cancel(staging.request_id)
                raise SllmError("staging prefill timed out", code="engine_error") from None
            if isinstance(event, ErrorEvent):
                raise SllmError(f"staging prefill failed: {event.message}", code=event.code)
            if isinstance(event, FinishEvent):
                return
