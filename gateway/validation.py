"""Request validation at the edge: nothing malformed reaches a node. Pure functions; each error
is ``InvalidInput`` naming the field and what is allowed."""

from __future__ import annotations

import json
from typing import Any

from sllm.errors import InvalidInput
from sllm.spec import Generation
from sllm.structured import structured_output

MAX_TOKENS_LIMIT = 32768  # the spec's own bound on generation.max_tokens
MAX_STOP = 16
ROLES = ("system", "user", "assistant", "tool", "developer")
NATIVE_KEYS = {
    "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
    "request_id", "logprobs", "presence_penalty", "frequency_penalty", "response_format",
    "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip
# Passed to the instance as they are: its backend honours them or refuses them (400).
_PASSED = ("presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
           "parallel_tool_calls")  # fmt: skip
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidInput("request body is empty: expected a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:  # the parser recurses per level: ~1000 levels exhaust the stack
        raise InvalidInput("invalid JSON: nested too deeply") from None


def text_field(value: str, where: str) -> str:
    """``value`` if it is valid Unicode text: JSON can carry a lone surrogate (``"\\ud800"``),
    which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        raise InvalidInput(
            f"{where}: not valid Unicode text (a lone surrogate {bad} at position {exc.start})"
        ) from None
    return value


def _object(data: object) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be a JSON object, got {_kind(data)}")
    return data


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)  # fmt: skip


def int_field(data: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{key}: expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise InvalidInput(f"{key}: must be between {lo} and {hi}, got {value}")
    return value


def float_field(data: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{key}: expected a number, got {_kind(value)}")
    if not lo <= value <= hi:
        raise InvalidInput(f"{key}: must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def bool_field(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"{key}: expected a boolean, got {_kind(value)}")
    return value


def stop_field(data: dict[str, Any]) -> list[str] | None:
    value = data.get("stop")
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise InvalidInput("stop: expected a non-empty string or a list of non-empty strings")
    if len(value) > MAX_STOP:
        raise InvalidInput(f"stop: at most {MAX_STOP} sequences, got {len(value)}")
    return [text_field(s, f"stop[{i}]") for i, s in enumerate(value)]


def messages_field(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Role and content of each message, and the tool fields of a conversation with tools
    (an assistant turn's ``tool_calls``, a tool turn's ``tool_call_id``, ``name``)."""
    value = data.get("messages")
    if not isinstance(value, list):
        raise InvalidInput(f"messages: expected a list of messages, got {_kind(value)}")
    if not value:
        raise InvalidInput("messages: must contain at least one message")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidInput(f"{where}: expected an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidInput(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if content is None and msg.get("tool_calls"):
            content = ""  # an assistant turn that only called tools
        message: dict[str, Any] = {"role": role, "content": _content(content, f"{where}.content")}
        message.update({k: msg[k] for k in _TOOL_FIELDS if msg.get(k) is not None})
        out.append(message)
    return out


def _content(value: object, where: str) -> str:
    """A string, or the OpenAI list-of-parts form with text parts only."""
    if isinstance(value, str):
        return text_field(value, where)
    if isinstance(value, list):
        parts: list[str] = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidInput(f"{where}[{j}]: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidInput(f"{where}[{j}].text: expected a string")
            parts.append(text_field(text, f"{where}[{j}].text"))
        return "".join(parts)
    raise InvalidInput(f"{where}: expected a string, got {_kind(value)}")


def sampling(
    data: dict[str, Any], defaults: Generation, max_tokens_key: str = "max_tokens"
) -> dict[str, Any]:
    """max_tokens, temperature, top_p, stop and seed, checked, with the function's defaults."""
    max_tokens = int_field(data, max_tokens_key, 1, MAX_TOKENS_LIMIT)
    temperature = float_field(data, "temperature", 0.0, 2.0)
    top_p = float_field(data, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise InvalidInput("top_p: must be greater than 0 and at most 1, got 0")
    seed = int_field(data, "seed", -(2**63), 2**64 - 1)
    return {
        "max_tokens": max_tokens if max_tokens is not None else defaults.max_tokens,
        "temperature": temperature if temperature is not None else defaults.temperature,
        "top_p": top_p if top_p is not None else defaults.top_p,
        "stop": stop_field(data) or [],
        "seed": seed,
    }


def native_generate(data: object, defaults: Generation) -> dict[str, Any]:
    """The Instance API's generate body (``/function/<name>`` of a builtin handler)."""
    body = _object(data)
    for key in body:
        if key not in NATIVE_KEYS:
            raise InvalidInput(f"{key}: unknown field (allowed: {', '.join(sorted(NATIVE_KEYS))})")
    out = sampling(body, defaults)
    if "messages" in body and "prompt" in body:
        raise InvalidInput("prompt, messages: give one of them, not both")
    if "messages" in body:
        out["messages"] = messages_field(body)
    elif isinstance(body.get("prompt"), str):
        out["prompt"] = text_field(body["prompt"], "prompt")
    else:
        raise InvalidInput(
            f"prompt: expected a string (or give messages), got {_kind(body.get('prompt'))}"
        )
    out["stream"] = bool_field(body, "stream")
    logprobs = int_field(body, "logprobs", 0, 20)
    if logprobs is not None:
        out["logprobs"] = logprobs
    out.update({k: body[k] for k in _PASSED if body.get(k) is not None})
    structured_output(body)  # response_format, tools, tool_choice: checked here, applied there
    request_id = body.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidInput(f"request_id: expected a string, got {_kind(request_id)}")
        out["request_id"] = request_id
    return out


def openai_model(data: object) -> tuple[dict[str, Any], str]:
    body = _object(data)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput(f"model: expected the function name as a string, got {_kind(model)}")
    return body, model
