"""A batch of sequences decoded together: one left-padded key-value cache.

Every row's newest token sits in the last column, so one decoding step appends one column for
all rows at once. A sequence joins with its own prefilled cache (the shorter side is padded on
the left); a finished one leaves by row selection, and columns that became padding in every row
are trimmed. An attention mask marks the real positions; position ids count them per row, so a
row computes what it would compute alone.
"""

from __future__ import annotations

from typing import Any

import torch

from sllm.errors import UnsupportedModel


def _layers(cache: Any) -> list[Any]:
    layers: list[Any] = cache.layers
    for layer in layers:
        if not hasattr(layer, "keys") or getattr(layer, "is_sliding", False):
            raise TypeError(f"unsupported cache layer {type(layer).__name__} for batching")
    return layers


def check_batchable(cache: Any, model_type: str) -> None:
    """Refuse a model whose cache this batch cannot hold: only full-attention layers
    (``DynamicLayer``: keys and values grow one column a step) can be left-padded and
    concatenated. Sliding-window layers drop old columns and linear-attention (hybrid)
    layers keep a state instead; such a model would load, report ready, and fail every
    request, so the load fails here with the reason."""
    from transformers.cache_utils import DynamicLayer

    odd = sorted(
        {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    )
    if odd:
        raise UnsupportedModel(
            f"model type {model_type!r} uses {', '.join(odd)} cache layers (sliding-window or "
            "hybrid attention), which this engine cannot batch; serve it with a backend that "
            "supports them"
        )


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = torch.zeros((*t.shape[:2], n, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


class KVBatch:
    """The rows of the running batch and their cache. ``ids[i]`` names row ``i``."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 where a position is real

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, request_id: str, cache: Any, length: int) -> None:
        """Add a sequence prefilled on its own (``cache`` holds ``length`` positions, batch 1)."""
        device = _layers(cache)[0].keys.device
        new_mask = torch.ones((1, length), dtype=torch.long, device=device)
        if self.cache is None or self.mask is None:
            self.ids, self.cache, self.mask = [request_id], cache, new_mask
            return
        width = max(self.columns, length)
        grow_old, grow_new = width - self.columns, width - length
        for old, new in zip(_layers(self.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, grow_old), _pad_left(new.keys, grow_new)])
            old.values = torch.cat(
                [_pad_left(old.values, grow_old), _pad_left(new.values, grow_new)]
            )
        zeros = torch.zeros
        self.mask = torch.cat(
            [
                torch.cat(
                    [zeros((len(self), grow_old), dtype=torch.long, device=device), self.mask], 1
                ),
                torch.cat([zeros((1, grow_new), dtype=torch.long, device=device), new_mask], 1),
            ]
        )
        self.ids.append(request_id)

    def remove(self, request_ids: set[str]) -> None:
        """Drop rows, then trim columns that are padding in every remaining row."""
        keep = [i for i, rid in enumerate(self.ids) if rid not in request_ids]
        if len(keep) == len(self.ids):
            return
        if not keep:
            self.ids, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real_columns = mask.any(dim=0).nonzero()
        first = int(real_columns[0].item()) if real_columns.numel() else 0
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]
        self.mask = mask[:, first:]
        self.ids = [self.ids[i] for i in keep]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask with the new column, position ids of the new tokens) for one step."""
        assert self.mask is not None
        ones = torch.ones((len(self), 1), dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True)
        return mask, positions

    def commit_step(self, mask: torch.Tensor) -> None:
        """Record that the step ran (the cache grew by one column inside the model)."""
        self.mask = mask
