"""Translation between the Instance API's native answers and OpenAI's shapes (pure).

Native stream events (shared contract): ``{"delta", "token_ids"}`` per token batch, then
``{"finish_reason", "usage"}``, then ``[DONE]``; an error mid-stream is ``{"error": {...}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        out: list[str] = []
        while True:
            cut = _event_end(self._buffer)
            if cut is None:
                return out
            raw, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1] :]
            data = [
                line[5:].lstrip(b" ")
                for line in raw.replace(b"\r\n", b"\n").split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                out.append(b"\n".join(data).decode("utf-8", errors="replace"))


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for sep in (b"\n\n", b"\r\n\r\n"):
        i = buffer.find(sep)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(sep))
    return best


def sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


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


@dataclass
class OpenAIStream:
    """Turns native stream events into OpenAI chunks for one request."""

    model: str
    chat: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    _started: bool = False

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

    def translate(self, event: dict[str, Any]) -> list[bytes]:
        """The OpenAI SSE lines for one native event."""
        if "error" in event:
            err = event["error"] if isinstance(event["error"], dict) else {}
            return [sse(openai_error(502, str(err.get("code", "instance_error")),
                                     str(err.get("message", "the instance failed"))))]  # fmt: skip
        out: list[bytes] = []
        if "delta" in event:
            text = str(event.get("delta") or "")
            if self.chat:
                delta: dict[str, Any] = {"content": text}
                if not self._started:
                    delta = {"role": "assistant", "content": text}
                out.append(sse(self._chunk({"index": 0, "delta": delta, "finish_reason": None})))
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
                out.append(sse(self._chunk(choice)))
            self._started = True
        if "finish_reason" in event:
            reason = str(event.get("finish_reason") or "stop")
            if self.chat:
                choice = {"index": 0, "delta": {}, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
            out.append(sse(self._chunk(choice)))
            if self.include_usage:
                out.append(sse(self._chunk({}, _usage(event.get("usage")))))
        return out

    def done(self) -> bytes:
        return sse("[DONE]")


def openai_response(native: dict[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """A native non-stream answer as an OpenAI (chat) completion."""
    text = native.get("text")
    if not isinstance(text, str):
        raise ProtocolError("instance answer has no text")
    reason = str(native.get("finish_reason") or "stop")
    created = int(time.time())
    if chat:
        return {
            "id": f"chatcmpl-{native.get('id') or uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(native.get("usage")),
        }
    return {
        "id": f"cmpl-{native.get('id') or uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
        "usage": _usage(native.get("usage")),
    }
