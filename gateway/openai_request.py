"""OpenAI request bodies -> the Instance API's generate body, validated at the edge (pure).

Every parameter is either passed on (the instance's backend honours it, or refuses it with a
400 naming it: the transformers backend has no log probabilities, penalties or output
constraints), handled here (``n``, ``echo``, ``stream_options``, turning a forced tool call's
JSON into ``tool_calls``), or refused with a 400 naming it. None is ignored.

The translation lives in the gateway, not in the instance, so a streamed request stays a
stream of the Instance API's native events: that is what live migration moves between
instances (by its tokens) and what the gateway splices; the OpenAI shape is built on top of
the spliced stream. ``n`` choices are ``n`` native requests (seeds ``seed + i``), each movable
on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.validation import (
    bool_field,
    float_field,
    int_field,
    messages_field,
    sampling,
    text_field,
)
from sllm.errors import InvalidInput
from sllm.spec import Generation
from sllm.structured import structured_output

MAX_N = 16  # choices per request: each is a request of its own on the instances
MAX_TOP_LOGPROBS = 20  # OpenAI's bounds: chat top_logprobs 0-20, completions logprobs 0-5
MAX_COMPLETION_LOGPROBS = 5

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
    "n", "presence_penalty", "frequency_penalty", "user",
}  # fmt: skip
CHAT_KEYS = _COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
    "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip
COMPLETION_KEYS = _COMMON | {"prompt", "logprobs", "echo", "best_of"}


@dataclass(frozen=True)
class OpenAIRequest:
    """One OpenAI request as sllm runs it. ``native``: the generate body of one choice;
    ``echo``: the prompt text each completion choice starts with; ``logprobs``: the answer
    carries log probabilities; ``tool_call``: the output is a forced tool call's JSON
    ("required": an array of {name, parameters}; else the named function's arguments)."""

    native: dict[str, Any]
    n: int
    include_usage: bool
    echo: str | None = None
    logprobs: bool = False
    tool_call: str | None = None

    @property
    def stream(self) -> bool:
        return bool(self.native.get("stream"))

    def choice_bodies(self) -> list[dict[str, Any]]:
        """The native body of each choice: seeded choices get seeds ``seed + i`` (they
        would all be the same sample otherwise); unseeded ones each draw their own."""
        bodies = []
        for i in range(self.n):
            body = dict(self.native)
            if body.get("seed") is not None and i:
                body["seed"] = (int(body["seed"]) + i) % 2**31
            bodies.append(body)
        return bodies


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidInput(
                f"{key}: not a parameter sllm supports here (supported: {', '.join(sorted(allowed))})"
            )


def _common(body: dict[str, Any], defaults: Generation, max_tokens_key: str) -> dict[str, Any]:
    out = sampling(body, defaults, max_tokens_key)
    if out["seed"] is not None:
        out["seed"] = out["seed"] % 2**31  # the instance's seeds are 0..2^31-1
    else:
        del out["seed"]
    for key in ("presence_penalty", "frequency_penalty"):
        value = float_field(body, key, -2.0, 2.0)
        if value:
            out[key] = value
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        # OpenAI's end-user id for its abuse monitoring: sllm has none, so it has no effect
        raise InvalidInput("user: expected a string")
    out["stream"] = bool_field(body, "stream")
    return out


def _n(body: dict[str, Any]) -> int:
    n = int_field(body, "n", 1, MAX_N)
    return 1 if n is None else n


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidInput("stream_options: expected an object")
    _unknown(options, {"include_usage"})
    return bool_field(options, "include_usage")


def parse_chat(body: dict[str, Any], defaults: Generation) -> OpenAIRequest:
    _unknown(body, CHAT_KEYS)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    out = _common(body, defaults, key)
    out["messages"] = messages_field(body)
    logprobs = bool_field(body, "logprobs")
    top = int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise InvalidInput("top_logprobs: needs logprobs: true")
    if logprobs:
        out["logprobs"] = top or 0
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidInput("parallel_tool_calls: expected a boolean")
    for key in ("response_format", "tools", "tool_choice", "parallel_tool_calls"):
        if body.get(key) is not None:
            out[key] = body[key]
    structured = structured_output(body)  # validated here, applied by the instance
    tool_call = None
    if structured is not None and structured["source"] == "tool_choice":
        choice = body["tool_choice"]
        tool_call = "required" if choice == "required" else str(choice["function"]["name"])
    return OpenAIRequest(out, _n(body), include_usage(body), None, logprobs, tool_call)


def parse_completion(body: dict[str, Any], defaults: Generation) -> OpenAIRequest:
    _unknown(body, COMPLETION_KEYS)
    out = _common(body, defaults, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput("prompt: expected a string (or a list of one string)")
    out["prompt"] = text_field(prompt, "prompt")
    n = _n(body)
    best_of = int_field(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise InvalidInput("best_of: only best_of equal to n (no extra candidates) is supported")
    logprobs = int_field(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    if logprobs is not None:
        out["logprobs"] = logprobs
    echo = bool_field(body, "echo")
    if echo and logprobs is not None:
        raise InvalidInput(
            "echo: with logprobs it needs the prompt's log probabilities, which sllm does "
            "not compute; ask for one of them"
        )
    return OpenAIRequest(
        out, n, include_usage(body), prompt if echo else None, logprobs is not None
    )


EMBEDDING_KEYS = {"model", "input", "encoding_format", "user"}
MAX_EMBEDDING_INPUTS = 2048


def parse_embeddings(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """An OpenAI embeddings body -> (the Instance API's embed body, encoding_format)."""
    _unknown(body, EMBEDDING_KEYS)
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(texts, list)
        or not 0 < len(texts) <= MAX_EMBEDDING_INPUTS
        or not all(isinstance(t, str) and t for t in texts)
    ):
        raise InvalidInput(
            f"input: expected a non-empty string or a list of 1 to {MAX_EMBEDDING_INPUTS} of "
            "them (token arrays are not supported)"
        )
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidInput(f"encoding_format: expected 'float' or 'base64', got {encoding!r}")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidInput("user: expected a string")
    return {"input": texts}, str(encoding)
