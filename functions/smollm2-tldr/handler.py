"""Summarize a text in one sentence: pre- and post-processing around a chat model.

Request: ``{"text": "...", "stream": false}``. Answer: ``{"summary", "input_tokens",
"truncated", "usage"}``; with ``"stream": true`` the summary streams as text deltas instead.
"""

from __future__ import annotations

import re
from typing import Any

from sllm.errors import InvalidInput

INSTRUCTION = "Summarize the following text in one short sentence."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def load(model: Any, tokenizer: Any, env: dict[str, str]) -> dict[str, Any]:
    """Runs once per instance: keep the tokenizer for truncation and read the limit."""
    return {"tokenizer": tokenizer, "max_input_tokens": int(env.get("MAX_INPUT_TOKENS", "768"))}


def truncate(text: str, tokenizer: Any, limit: int) -> tuple[str, int, bool]:
    """The text cut to ``limit`` tokens, its token count, and whether it was cut."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= limit:
        return text, len(ids), False
    return tokenizer.decode(ids[:limit]), len(ids), True


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else text


def handle(request: dict[str, Any], ctx: Any) -> Any:
    text = request.get("text") or request.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput('send {"text": "<the text to summarize>"}')
    text, n_tokens, truncated = truncate(
        text.strip(), ctx.state["tokenizer"], ctx.state["max_input_tokens"]
    )
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}]
    if request.get("stream"):
        return ctx.stream(messages=messages)
    result = ctx.generate(messages=messages)
    return {
        "summary": first_sentence(result["text"]),
        "input_tokens": n_tokens,
        "truncated": truncated,
        "usage": result["usage"],
    }
