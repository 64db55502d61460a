"""Turning a generate request body into prompt token ids and sampling parameters.

A body has either ``prompt`` (a string, tokenized as is) or ``messages`` (a list of
``{"role", "content"}`` rendered with the model's chat template and the assistant turn
opened). Every bad field raises ``InvalidInput`` naming it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from runtime.engine.request import RequestState
from runtime.engine.sampling import SamplingDefaults, parse_sampling
from sllm.errors import InvalidInput
from sllm.structured import structured_output, tools_field

MAX_MESSAGES = 512
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class Tokenizing:
    """What the engine needs from a tokenizer (a transformers tokenizer adapter)."""

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, *, special: bool) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can carry a lone surrogate ("\ud800")
            raise InvalidInput(
                f"prompt: not valid Unicode text (a lone surrogate at position {exc.start})"
            ) from None
        ids: list[int] = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        return list(ids)

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders tools (one that never reads ``tools`` would drop
        them without a word)."""
        return "tools" in str(getattr(self.tokenizer, "chat_template", None) or "")

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        extra = {"tools": tools} if tools else {}
        rendered: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **extra
        )
        return rendered

    def decode(self, ids: Any) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text


# A conversation with tools carries these beside role and content (chat templates render them).
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def _messages(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("messages: expected a non-empty list of {role, content} objects")
    if len(raw) > MAX_MESSAGES:
        raise InvalidInput(f"messages: at most {MAX_MESSAGES} messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidInput(f"messages[{i}]: expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidInput(f"messages[{i}].role: expected a non-empty string")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            content = "".join(p for p in parts if isinstance(p, str))
        if content is None and m.get("tool_calls"):
            content = ""  # an assistant turn that only called tools
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content: expected a string")
        message: dict[str, Any] = {"role": role, "content": content}
        message.update({k: m[k] for k in _TOOL_FIELDS if m.get(k) is not None})
        out.append(message)
    return out


def request_id_of(body: dict[str, Any]) -> str:
    rid = body.get("request_id")
    if rid is None:
        return uuid.uuid4().hex
    if not isinstance(rid, str) or not _REQUEST_ID_RE.match(rid):
        raise InvalidInput(
            "request_id: expected 1-128 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return rid


def build_request(
    body: object, tok: Tokenizing, defaults: SamplingDefaults, *, chat: bool = True
) -> RequestState:
    """A new ``RequestState`` from a request body. ``chat`` False (the completion handler)
    refuses ``messages``."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object")
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise InvalidInput("body: give exactly one of 'prompt' (a string) or 'messages' (a list)")
    if has_messages:
        if not chat:
            raise InvalidInput("messages: this function is a completion function; send 'prompt'")
        if not tok.has_chat_template:
            raise InvalidInput("messages: this model has no chat template; send 'prompt'")
        tools = tools_field(body)
        if tools and not tok.template_has_tools:
            raise InvalidInput("tools: this model's chat template does not render tools")
        text = tok.render_chat(_messages(body["messages"]), tools)
        ids = tok.encode(text, special=False)
    else:
        if body.get("tools") is not None:
            raise InvalidInput("tools: need 'messages' (a chat), not 'prompt'")
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput("prompt: expected a non-empty string")
        ids = tok.encode(prompt, special=True)
    if not ids:
        raise InvalidInput("prompt: tokenizes to no tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidInput(f"stream: expected true or false, got {stream!r}")
    params = parse_sampling(body, defaults)
    structured = structured_output(body)
    if structured is not None:
        params = replace(params, structured=structured)
    return RequestState(request_id=request_id_of(body), prompt_ids=ids, params=params)


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on one request's inputs


def embedding_inputs(body: object, tok: Tokenizing) -> list[list[int]]:
    """The token ids of each text of an embedding request (``{"input": str | [str, ...]}``)."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidInput(
            f"input: expected a string or a list of 1 to {MAX_EMBEDDING_INPUTS} strings"
        )
    prompts = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InvalidInput(f"input[{i}]: expected a non-empty string")
        ids = tok.encode(text, special=True)
        if not ids:
            raise InvalidInput(f"input[{i}]: tokenizes to no tokens")
        prompts.append(ids)
    return prompts
