"""sllm's sampling parameters as vLLM's ``SamplingParams``."""

from __future__ import annotations

from typing import Any

from runtime.engine.sampling import SamplingParams


def to_vllm(params: SamplingParams, produced: int) -> Any:
    """vLLM's parameters for a request that has ``produced`` output tokens already (0 for a
    new one; a migrated one continues with the rest of its ``max_tokens``).

    Stop strings are not passed: sllm's ``TextStream`` finds them (the same rule on both
    backends; the request is aborted in vLLM when one is seen), so vLLM does not detokenize.
    The seed is passed only for sampled requests: greedy ones need no generator."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampled = params.temperature > 0.0 and params.top_p > 0.0
    return VllmSamplingParams(
        max_tokens=params.max_tokens - produced,
        temperature=params.temperature if sampled else 0.0,
        top_p=params.top_p if sampled else 1.0,
        seed=params.seed if sampled else None,
        ignore_eos=params.ignore_eos,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
