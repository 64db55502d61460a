"""SSE parsing and native -> OpenAI translation (pure)."""

from __future__ import annotations

import json

from gateway.openai_format import OpenAIStream, SseParser, openai_response


def test_sse_parser_handles_events_split_anywhere() -> None:
    raw = b'data: {"delta": "a"}\n\ndata: {"delta": "b"}\r\n\r\n: comment\n\ndata: [DONE]\n\n'
    for cut in range(1, len(raw)):
        parser = SseParser()
        out = parser.feed(raw[:cut]) + parser.feed(raw[cut:])
        assert out == ['{"delta": "a"}', '{"delta": "b"}', "[DONE]"]


def chunks(lines: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(line.decode()[6:]) for line in lines]


def test_chat_stream_translation_role_then_content_then_finish_and_usage() -> None:
    s = OpenAIStream(model="m", chat=True, include_usage=True)
    first = chunks(s.translate({"delta": "He", "token_ids": [1]}))
    second = chunks(s.translate({"delta": "llo", "token_ids": [2]}))
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    end = chunks(s.translate({"finish_reason": "length", "usage": usage}))
    assert first[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": "He"}, "finish_reason": None}
    ]
    assert second[0]["choices"][0]["delta"] == {"content": "llo"}  # type: ignore[index]
    assert end[0]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert end[1]["choices"] == [] and end[1]["usage"] == usage
    assert {c["id"] for c in first + second + end} == {s.id}
    assert s.done() == b"data: [DONE]\n\n"


def test_error_event_becomes_an_openai_error() -> None:
    s = OpenAIStream(model="m", chat=False, include_usage=False)
    (err,) = chunks(s.translate({"error": {"code": "instance_failed", "message": "boom"}}))
    assert err["error"] == {"message": "boom", "type": "server_error", "param": None,
                            "code": "instance_failed"}  # fmt: skip


def test_non_stream_answers() -> None:
    native = {"id": "x", "text": "hi", "finish_reason": "stop",
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    chat = openai_response(native, "m", chat=True)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert chat["usage"]["total_tokens"] == 2
    text = openai_response(native, "m", chat=False)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hi"
