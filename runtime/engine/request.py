"""Per-request generation state and the events a request produces.

The state is what live migration moves between instances (issue 7): prompt token ids, the
token ids generated so far, the sampling parameters with their seed, and how much text was
released. The number of sampled steps is ``len(output_ids)``; with ``sample_token`` keyed by
``(seed, step)`` that is all a target needs to continue with identical tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from runtime.engine.detokenize import TextStream
from runtime.engine.sampling import SamplingParams
from sllm.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """Text released by one decoding step and the token ids sampled in it; with ``logprobs``
    asked for, one entry per token: ``{"token_id", "token", "logprob", "top": [{"token_id",
    "token", "logprob"}, ...]}`` (``token``: the token's own text)."""

    delta: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent
Sink = Callable[[Event], None]
"""Receives a request's events; called from the engine thread, so it must be thread-safe."""


@dataclass
class RequestState:
    """A request in the engine. ``emitted_chars`` counts released characters of the decoded
    output; ``finish_reason`` is set once it ends."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    finish_reason: str | None = None

    @property
    def steps(self) -> int:
        """Tokens sampled so far: the index of the next draw of the seeded sampler."""
        return len(self.output_ids)

    def export(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "output_ids": list(self.output_ids),
            "params": self.params.to_dict(),
            "emitted_chars": self.emitted_chars,
        }

    @staticmethod
    def from_export(data: dict[str, Any]) -> RequestState:
        """Inverse of ``export``; InvalidInput names a missing or mistyped field."""
        try:
            request_id, prompt, output = data["request_id"], data["prompt_ids"], data["output_ids"]
            params, emitted = data["params"], data.get("emitted_chars", 0)
        except KeyError as exc:
            raise InvalidInput(f"request state: missing field {exc.args[0]!r}") from None
        if not isinstance(request_id, str):
            raise InvalidInput("request state: request_id must be a string")
        for name, ids in (("prompt_ids", prompt), ("output_ids", output)):
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
            ):
                raise InvalidInput(f"request state: {name} must be a list of token ids")
        if not prompt:
            raise InvalidInput("request state: prompt_ids is empty")
        if not isinstance(params, dict) or "seed" not in params:
            raise InvalidInput("request state: params must be a map with a seed")
        if not isinstance(emitted, int) or isinstance(emitted, bool) or emitted < 0:
            raise InvalidInput("request state: emitted_chars must be a non-negative integer")
        return RequestState(
            request_id=request_id,
            prompt_ids=list(prompt),
            params=SamplingParams.from_dict(params),
            output_ids=list(output),
            emitted_chars=emitted,
        )


def check_runnable(state: RequestState, max_context: int, vocab_size: int) -> None:
    """InvalidInput for a request no engine can run: nothing left to generate, prompt and
    output already filling the context, a token id outside the vocabulary (0: unknown)."""
    total = len(state.prompt_ids) + len(state.output_ids)
    if len(state.output_ids) >= state.params.max_tokens:
        raise InvalidInput(
            f"request already has {len(state.output_ids)} of max_tokens "
            f"{state.params.max_tokens} tokens: nothing left to generate"
        )
    if total >= max_context:
        raise InvalidInput(
            f"prompt is {total} tokens; this model's context is {max_context} tokens"
        )
    if vocab_size and any(t >= vocab_size for t in state.prompt_ids + state.output_ids):
        raise InvalidInput(f"token id out of range (vocabulary size {vocab_size})")


def deliver(sink: Sink, event: Event) -> None:
    """Hand ``event`` to ``sink``; a consumer that went away must not stop the engine."""
    try:
        sink(event)
    except Exception:
        log.debug("dropping an event for a gone consumer", exc_info=True)


@dataclass
class Admitted:
    """A request an engine has taken (either backend): its state, the sink its events go to,
    and its text released so far."""

    state: RequestState
    sink: Sink
    text: TextStream


@dataclass(frozen=True)
class EngineLoad:
    """In-flight requests and their token counts (the migration cost model's t_in, t_out)."""

    in_flight: int
    tokens_in: int
    tokens_out: int

    @classmethod
    def of(cls, states: Iterable[RequestState]) -> EngineLoad:
        items = list(states)
        return cls(
            in_flight=len(items),
            tokens_in=sum(len(s.prompt_ids) for s in items),
            tokens_out=sum(len(s.output_ids) for s in items),
        )
