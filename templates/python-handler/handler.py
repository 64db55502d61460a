"""Custom pre- and post-processing around the model.

``load(model, tokenizer, env)`` runs once per instance, before it takes requests; what it
returns is ``ctx.state`` in every call of ``handle``. ``handle(request, ctx)`` gets the JSON
body of ``POST /function/<name>`` and returns a JSON-able value, or an iterator of strings that
is streamed as server-sent events. ``ctx.generate(...)`` / ``ctx.stream(...)`` take the fields
of /v1/generate (``prompt`` or ``messages``, ``max_tokens``, ``temperature``, ``stop``, ...).
"""

from __future__ import annotations

from typing import Any

from sllm.errors import InvalidInput  # a 400 with this message, instead of a 500


def load(model: Any, tokenizer: Any, env: dict[str, str]) -> dict[str, Any]:
    return {"system": env.get("SYSTEM_PROMPT", "You are a helpful assistant.")}


def handle(request: dict[str, Any], ctx: Any) -> Any:
    # Pre-processing: accept {"question": ...} or {"prompt": ...}, tidy it, add the system prompt.
    question = str(request.get("question") or request.get("prompt") or "").strip()
    if not question:
        raise InvalidInput('send {"question": "..."}')
    messages = [
        {"role": "system", "content": ctx.state["system"]},
        {"role": "user", "content": question},
    ]
    options = {k: request[k] for k in ("max_tokens", "temperature", "seed") if k in request}
    if request.get("stream"):
        return ctx.stream(messages=messages, **options)
    result = ctx.generate(messages=messages, **options)
    # Post-processing: a trimmed answer and the token counts.
    return {"answer": result["text"].strip(), "usage": result["usage"]}
