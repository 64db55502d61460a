"""The Backend port: what the Instance API, custom handlers and live migration need of an
inference engine. Both adapters run their engine on one thread of the instance process and
talk to callers on other threads only through ``submit`` / ``cancel`` and the sinks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from runtime.engine.request import EngineLoad, RequestState, Sink


class Staging(Protocol):
    """Target side of live migration: prepare the KV state of requests about to be resumed
    here (``runtime.migration``), while the source keeps decoding them."""

    def stage(self, states: list[dict[str, Any]]) -> dict[str, int]:
        """Compute what is not computed yet of each exported state (blocking: run it in a
        thread). Returns request id -> tokens now covered."""
        ...

    def drop(self, request_ids: list[str]) -> int:
        """Forget staged requests (their migration was aborted); how many were known."""
        ...


class Backend(Protocol):
    """One instance's inference engine.

    ``name`` is "transformers" or "vllm"; ``max_context`` bounds prompt plus output tokens.
    ``submit`` queues a new request or one resumed with ``output_ids`` already generated (live
    migration) and raises ``InvalidInput`` for what this backend cannot run; its events
    (``TokenEvent``s, then one ``FinishEvent`` or ``ErrorEvent``) reach ``sink`` from the
    engine thread. ``snapshots`` exports every queued or running request (``RequestState.
    export``), each consistent with the events sent so far."""

    name: str
    max_context: int

    def start(self) -> None: ...

    def stop(self, reason: str = ...) -> None:
        """Fail what is queued or running with ``unavailable``; end the engine thread."""
        ...

    def submit(self, state: RequestState, sink: Sink) -> None: ...

    def cancel(self, request_id: str) -> None:
        """End a request between two steps; its sink gets a ``cancelled`` finish."""
        ...

    @property
    def cancelled(self) -> int:
        """Requests ended by ``cancel`` since start."""
        ...

    def load(self) -> EngineLoad: ...

    def snapshot(self, request_id: str) -> dict[str, Any] | None: ...

    def snapshots(self) -> list[dict[str, Any]]: ...

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """One embedding per prompt (token ids): the last token's final hidden state, L2
        normalised (vLLM's embedding pooling for causal LMs). Blocking: run it in a thread."""
        ...

    def new_stager(self, now: Callable[[], float]) -> Staging:
        """The migration stager of this backend (one per instance)."""
        ...
