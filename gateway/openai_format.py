"""Translation between the Instance API's native answers and OpenAI's shapes (pure).

Native stream events (shared contract): ``{"delta", "token_ids"}`` per token batch, then
``{"finish_reason", "usage"}``, then ``[DONE]``; an error mid-stream is ``{"error": {...}}``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.sse import EventSplitter, event_data, sse
from sllm.errors import ProtocolError

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body (the ``openai`` client reads message, type, param and code)."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class SseParser:
    """Splits a byte stream of server-sent events into the ``data`` payload of each event."""

    def __init__(self) -> None:
        self._events = EventSplitter()

    def feed(self, chunk: bytes) -> list[str]:
        """The data of each event ``chunk`` completes (events without data are skipped)."""
        out: list[str] = []
        for event in self._events.feed(chunk):
            data = event_data(event)
            if data is not None:
                out.append(data.decode("utf-8", errors="replace"))
        return out


def native_event(payload: str) -> dict[str, Any] | None:
    """One native event as a dict; None for ``[DONE]``."""
    if payload.strip() == "[DONE]":
        return None
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"instance sent a malformed stream event: {exc.msg}") from None
    if not isinstance(event, dict):
        raise ProtocolError("instance sent a stream event that is not an object")
    return event


def _usage(raw: object) -> dict[str, int]:
    usage = raw if isinstance(raw, dict) else {}
    prompt = int(usage.get("prompt_tokens", 0) or 0)
    completion = int(usage.get("completion_tokens", 0) or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens", prompt + completion) or 0),
    }


def total_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    """The usage of ``n`` choices of one prompt: the prompt counted once (as OpenAI does)."""
    prompt = max((u["prompt_tokens"] for u in usages), default=0)
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    token = str(entry.get("token", ""))
    return {"token": token, "logprob": float(entry.get("logprob", 0.0)),
            "bytes": list(token.encode("utf-8"))}  # fmt: skip


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The instance's per-token log probabilities in chat.completions' shape."""
    return {
        "content": [
            {**_token(e), "top_logprobs": [_token(t) for t in e.get("top", [])]} for e in entries
        ]
    }


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The same in completions' shape; ``offset``: characters of text before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(str(e.get("token", "")))
    return {
        "tokens": [str(e.get("token", "")) for e in entries],
        "token_logprobs": [float(e.get("logprob", 0.0)) for e in entries],
        "top_logprobs": [
            {str(t["token"]): float(t["logprob"]) for t in e.get("top", [])} for e in entries
        ],
        "text_offset": offsets,
    }


def tool_calls(text: str, tool_call: str) -> list[dict[str, Any]] | None:
    """A forced tool call's JSON output as OpenAI ``tool_calls`` (None: not valid JSON, e.g.
    cut by max_tokens). ``tool_call``: "required" (an array of {name, parameters}) or the
    named function (``text`` is its arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if tool_call != "required":
        calls = [(tool_call, text)]
    elif isinstance(value, list) and all(isinstance(c, dict) and "name" in c for c in value):
        calls = [(str(c["name"]), json.dumps(c.get("parameters", {}))) for c in value]
    else:
        return None
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": name, "arguments": arguments}}
        for name, arguments in calls
    ]  # fmt: skip


@dataclass
class OpenAIStream:
    """Turns one choice's native stream events into OpenAI chunks. ``index``: the choice;
    ``logprobs``: chunks carry them; ``tool_call``: the output is a forced tool call's JSON,
    sent as ``tool_calls`` once complete; ``echo``: text a completion choice starts with. The
    usage of the choice is kept in ``usage`` (the route sends one usage chunk for all)."""

    model: str
    chat: bool
    include_usage: bool = False
    index: int = 0
    logprobs: bool = False
    tool_call: str | None = None
    echo: str | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    usage: dict[str, int] | None = None
    _started: bool = False
    _text: str = ""

    def _chunk(self, choice: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice else [],
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _choice(
        self, text: str | None, reason: str | None, entries: list[Any], offset: int = 0
    ) -> dict[str, Any]:
        """One choice of a chunk; ``offset``: characters of text before ``entries``' tokens."""
        choice: dict[str, Any] = {"index": self.index}
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if not self._started:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(entries) if self.logprobs and entries else None
        else:
            choice["text"] = text or ""
            choice["logprobs"] = (
                completion_logprobs(entries, offset) if self.logprobs and entries else None
            )
        choice["finish_reason"] = reason
        self._started = True
        return choice

    def translate(self, event: dict[str, Any]) -> list[bytes]:
        """The OpenAI SSE lines for one native event."""
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {}
            return [sse(openai_error(502, str(err.get("code", "instance_error")),
                                     str(err.get("message", "the instance failed"))))]  # fmt: skip
        out: list[bytes] = []
        if "delta" in event:
            text = str(event.get("delta") or "")
            if self.echo is not None and not self._text:
                self._text, self.echo = self.echo, None
                text = self._text + text
            offset = len(self._text)
            self._text += str(event.get("delta") or "")
            entries = event.get("logprobs") or []
            if self.tool_call is None:
                out.append(sse(self._chunk(self._choice(text, None, entries, offset))))
            elif self.logprobs and entries:
                out.append(sse(self._chunk(self._choice(None, None, entries, offset))))
        if "finish_reason" in event:
            reason = str(event.get("finish_reason") or "stop")
            self.usage = _usage(event.get("usage"))
            if self.tool_call is not None:
                calls = tool_calls(self._text, self.tool_call)
                if calls is None:  # not a complete call (cut short): the text as it is
                    out.append(sse(self._chunk(self._choice(self._text, None, []))))
                else:
                    choice = self._choice(None, None, [])
                    choice["delta"]["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                    out.append(sse(self._chunk(choice)))
                    reason = "tool_calls" if reason == "stop" else reason
            out.append(sse(self._chunk(self._choice(None if self.chat else "", reason, []))))
        return out

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return sse(self._chunk({}, usage))

    def done(self) -> bytes:
        return sse("[DONE]")


def openai_response(
    natives: list[dict[str, Any]],
    model: str,
    chat: bool,
    *,
    tool_call: str | None = None,
    echo: str | None = None,
) -> dict[str, Any]:
    """Native non-stream answers (one per choice) as an OpenAI (chat) completion."""
    choices, usages = [], []
    for index, native in enumerate(natives):
        text = native.get("text")
        if not isinstance(text, str):
            raise ProtocolError("instance answer has no text")
        reason = str(native.get("finish_reason") or "stop")
        entries = native.get("logprobs")
        usages.append(_usage(native.get("usage")))
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = tool_calls(text, tool_call) if tool_call is not None else None
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
            logprobs = chat_logprobs(entries) if isinstance(entries, list) else None
            choices.append({"index": index, "message": message, "finish_reason": reason,
                            "logprobs": logprobs})  # fmt: skip
        else:
            full = (echo or "") + text
            logprobs = (
                completion_logprobs(entries, len(echo or "")) if isinstance(entries, list) else None
            )
            choices.append({"index": index, "text": full, "finish_reason": reason,
                            "logprobs": logprobs})  # fmt: skip
    first = natives[0].get("id") if natives else None
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{first or uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": total_usage(usages),
    }


def embeddings_response(native: dict[str, Any], model: str, encoding: str) -> dict[str, Any]:
    """The instance's ``/v1/embed`` answer in OpenAI's shape; ``base64``: each vector's
    float32 values, little-endian (what the ``openai`` client asks for by default)."""
    data = native.get("data")
    if not isinstance(data, list):
        raise ProtocolError("instance embedding answer has no data")
    out: list[dict[str, Any]] = []
    for item in data:
        vector = [float(v) for v in item.get("embedding", [])]
        embedding: list[float] | str = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        out.append({"object": "embedding", "index": int(item.get("index", len(out))),
                    "embedding": embedding})  # fmt: skip
    tokens = _usage(native.get("usage"))["prompt_tokens"]
    return {"object": "list", "data": out, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
