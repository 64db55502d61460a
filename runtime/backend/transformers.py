"""The transformers backend: sllm's own continuous-batching engine (``runtime.engine``) over a
transformers causal LM built from the DRAM image's zero-copy views. Light and exact: it runs
any architecture transformers has, and most tests use it."""

from __future__ import annotations

from collections.abc import Callable

from runtime.engine.engine import Engine
from runtime.migration.staging import Stager


class TransformersBackend(Engine):
    """``Engine`` as a ``Backend``: its migration stager recomputes transformers caches."""

    name = "transformers"

    def new_stager(self, now: Callable[[], float]) -> Stager:
        return Stager(self, now)
