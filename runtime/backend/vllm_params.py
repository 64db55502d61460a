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
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    sampled = params.temperature > 0.0 and params.top_p > 0.0
    structured = None
    if params.structured:
        if params.structured.get("json_object"):
            structured = StructuredOutputsParams(json_object=True)
        else:
            structured = StructuredOutputsParams(json=params.structured["json"])
    return VllmSamplingParams(
        max_tokens=params.max_tokens - produced,
        temperature=params.temperature if sampled else 0.0,
        top_p=params.top_p if sampled else 1.0,
        seed=params.seed if sampled else None,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        structured_outputs=structured,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def logprob_entries(
    step: Any, tokens: list[int], top: int, token_text: Any
) -> list[dict[str, Any]]:
    """sllm's per-token log-probabilities (``TokenEvent.logprobs``) from vLLM's: for each
    sampled token, a map of token id -> ``Logprob`` (the sampled one and the ``top`` best,
    ranked). ``token_text(id)``: the token's own text."""
    entries = []
    for token, ranked in zip(tokens, step or [], strict=False):
        sampled = ranked.get(token)
        best = sorted(ranked.items(), key=lambda kv: kv[1].rank)[:top]
        entries.append(
            {
                "token_id": token,
                "token": token_text(token),
                "logprob": float(sampled.logprob) if sampled is not None else float("-inf"),
                "top": [
                    {"token_id": t, "token": token_text(t), "logprob": float(lp.logprob)}
                    for t, lp in best
                ],
            }
        )
    return entries
