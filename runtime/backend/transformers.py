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

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Last-token pooling of the base model's final (normed) hidden state, L2 normalised:
        the same vector vLLM's embedding runner gives a causal LM. An embedding function's
        instance generates nothing, so this does not compete with the engine thread."""
        import torch

        vectors = []
        with torch.inference_mode():
            for ids in prompts:
                inputs = torch.tensor([ids], dtype=torch.long, device=self.device)
                hidden = self.model.base_model(input_ids=inputs).last_hidden_state[0, -1]
                vectors.append(torch.nn.functional.normalize(hidden.float(), dim=0).tolist())
        return vectors

    def new_stager(self, now: Callable[[], float]) -> Stager:
        return Stager(self, now)
