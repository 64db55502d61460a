"""The transformers backend: sllm's own continuous-batching engine (``runtime.engine``) over a
transformers causal LM built from the DRAM image's zero-copy views. Light and exact: it runs
any architecture transformers has, and most tests use it."""

from __future__ import annotations

from collections.abc import Callable

from runtime.engine.engine import Engine
from runtime.engine.request import RequestState, Sink
from runtime.migration.staging import Stager
from sllm.errors import InvalidInput


class TransformersBackend(Engine):
    """``Engine`` as a ``Backend``: its migration stager recomputes transformers caches. Its
    sampler has temperature, top-p, stop strings and seeds; a request asking for more (log
    probabilities, penalties, an output constraint) is refused, naming the field."""

    name = "transformers"

    def submit(self, state: RequestState, sink: Sink) -> None:
        unsupported = state.params.extras()
        if unsupported:
            raise InvalidInput(
                f"{unsupported[0]}: this function runs on the transformers backend, which does "
                "not support it (a function with backend: vllm, or auto on a node with vLLM, "
                "does)"
            )
        super().submit(state, sink)

    def new_stager(self, now: Callable[[], float]) -> Stager:
        return Stager(self, now)
