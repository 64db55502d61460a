"""Sampling parameters and the sampler: greedy, temperature and nucleus (top-p) sampling.

Seeded sampling is a pure function of ``(seed, step, logits)``: the random draw for the token at
``step`` (0 for the first generated token) comes from a generator seeded with a hash of the
request's seed and that step, never from a stream shared with other requests. So a request
gives the same tokens alone or batched, and one resumed elsewhere (live migration) continues
with exactly the tokens it would have produced where it started.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from sllm.errors import InvalidInput

# 2**31 - 1: seeds must fit a JSON integer every client handles and torch's manual_seed.
MAX_SEED = 2**31 - 1
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature`` 0 means greedy; ``seed`` is always set (a
    random one is drawn when the client gives none) so the request's state can be exported.

    Beyond sampling proper (not every backend has them: ``extras`` names the ones set):
    ``logprobs`` asks for each token's log-probability and that many top alternatives;
    ``presence_penalty`` / ``frequency_penalty`` are OpenAI's; ``structured`` constrains the
    output: ``{"json": <JSON schema>}`` or ``{"json_object": true}``
    (``sllm.structured``)."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured: dict[str, Any] | None = None

    def extras(self) -> list[str]:
        """The request fields behind the set extras (for a backend that lacks them)."""
        named = [
            ("logprobs", self.logprobs is not None),
            ("presence_penalty", self.presence_penalty != 0.0),
            ("frequency_penalty", self.frequency_penalty != 0.0),
            (str((self.structured or {}).get("source", "response_format")), bool(self.structured)),
        ]
        return [name for name, on in named if on]

    @property
    def movable(self) -> bool:
        """Whether live migration may move the request: penalties count the output tokens
        and an output constraint follows them, state a resume (which takes them as prompt)
        does not rebuild."""
        return not (self.structured or self.presence_penalty or self.frequency_penalty)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }
        if self.logprobs is not None:
            data["logprobs"] = self.logprobs
        if self.presence_penalty:
            data["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            data["frequency_penalty"] = self.frequency_penalty
        if self.structured:
            data["structured"] = dict(self.structured)
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SamplingParams:
        return parse_sampling(data, SamplingParams(), allow_extra=True)


@dataclass(frozen=True)
class SamplingDefaults:
    """The function's defaults (``spec.generation``) applied where a request leaves a field out."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens_limit: int = 32768


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
    if not lo <= float(value) <= hi:
        raise InvalidInput(f"{key}: must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInput(f"{key}: must be in [{lo}, {hi}], got {value}")
    return value


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    raw = body.get("stop")
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        raise InvalidInput("stop: expected a non-empty string or a list of non-empty strings")
    if len(raw) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in raw):
        raise InvalidInput(
            f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"
        )
    return tuple(raw)


def parse_sampling(
    body: dict[str, Any], defaults: SamplingParams | SamplingDefaults, *, allow_extra: bool = False
) -> SamplingParams:
    """The sampling fields of a request body, validated; InvalidInput names the bad field."""
    limit = defaults.max_tokens_limit if isinstance(defaults, SamplingDefaults) else 1 << 30
    seed_raw = body.get("seed")
    if seed_raw is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    else:
        seed = _integer(body, "seed", 0, 0, MAX_SEED)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidInput(f"ignore_eos: expected true or false, got {ignore_eos!r}")
    logprobs = body.get("logprobs")
    structured = body.get("structured") if allow_extra else None
    if structured is not None and not isinstance(structured, dict):
        raise InvalidInput("structured: expected an object")
    return SamplingParams(
        max_tokens=_integer(body, "max_tokens", defaults.max_tokens, 1, limit),
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0),
        stop=_stops(body),
        seed=seed,
        ignore_eos=ignore_eos,
        logprobs=None if logprobs is None else _integer(body, "logprobs", 0, 0, MAX_LOGPROBS),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        structured=structured,
    )


def step_seed(seed: int, step: int) -> int:
    """The generator seed for the draw at ``step``: a 63-bit hash, so neighbouring seeds and
    steps give unrelated streams (torch.Generator accepts seeds below 2**63)."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{step}".encode()) & (2**63 - 1)


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """The next token from one row of logits (shape ``[vocab]``), a pure function of its
    arguments. Runs on CPU in float32 so the draw does not depend on the device or dtype."""
    row = logits.detach().to(device="cpu", dtype=torch.float32)
    if params.temperature == 0.0 or params.top_p == 0.0:
        return int(torch.argmax(row).item())
    probs = torch.softmax(row / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (cumulative - sorted_probs) < params.top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(step_seed(params.seed, step))
    return int(torch.multinomial(probs, 1, generator=generator).item())
