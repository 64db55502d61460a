"""SSE parsing and native -> OpenAI translation (pure)."""

from __future__ import annotations

import json

from gateway.openai_format import (
    OpenAIStream,
    SseParser,
    openai_response,
    tool_calls,
    total_usage,
)


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
        {"index": 0, "delta": {"role": "assistant", "content": "He"}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    assert second[0]["choices"][0]["delta"] == {"content": "llo"}  # type: ignore[index]
    assert end[0]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert s.usage == usage  # the route sends one usage chunk for all choices
    (last,) = chunks([s.usage_chunk(usage)])
    assert last["choices"] == [] and last["usage"] == usage
    assert {c["id"] for c in [*first, *second, *end, last]} == {s.id}
    assert s.done() == b"data: [DONE]\n\n"


LOGPROBS = [{"token_id": 7, "token": "é", "logprob": -0.5,
             "top": [{"token_id": 7, "token": "é", "logprob": -0.5},
                     {"token_id": 8, "token": "e", "logprob": -1.5}]}]  # fmt: skip


def test_logprobs_in_chat_and_completion_shapes() -> None:
    chat = OpenAIStream(model="m", chat=True, logprobs=True)
    (c,) = chunks(chat.translate({"delta": "é", "token_ids": [7], "logprobs": LOGPROBS}))
    content = c["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    assert content == [{"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
        {"token": "e", "logprob": -1.5, "bytes": [101]}]}]  # fmt: skip
    text = OpenAIStream(model="m", chat=False, logprobs=True, echo="Say: ")
    (t,) = chunks(text.translate({"delta": "é", "token_ids": [7], "logprobs": LOGPROBS}))
    assert t["choices"][0]["text"] == "Say: é"  # type: ignore[index]
    assert t["choices"][0]["logprobs"] == {  # type: ignore[index]
        "tokens": ["é"], "token_logprobs": [-0.5], "top_logprobs": [{"é": -0.5, "e": -1.5}],
        "text_offset": [5],
    }  # fmt: skip


def test_forced_tool_call_json_becomes_tool_calls() -> None:
    named = tool_calls('{"city": "Paris"}', "weather")
    assert named is not None and named[0]["function"] == {
        "name": "weather", "arguments": '{"city": "Paris"}'}  # fmt: skip
    required = tool_calls('[{"name": "a", "parameters": {"x": 1}}, {"name": "b"}]', "required")
    assert required is not None
    assert [c["function"] for c in required] == [
        {"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": "{}"}]  # fmt: skip
    assert tool_calls('{"city": "Par', "weather") is None  # cut by max_tokens
    s = OpenAIStream(model="m", chat=True, tool_call="weather")
    assert s.translate({"delta": '{"city": ', "token_ids": [1]}) == []  # held until complete
    s.translate({"delta": '"Rome"}', "token_ids": [2]})
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    call, end = chunks(s.translate({"finish_reason": "stop", "usage": usage}))
    delta = call["choices"][0]["delta"]  # type: ignore[index]
    assert delta["role"] == "assistant"
    assert delta["tool_calls"][0]["index"] == 0
    assert delta["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": '{"city": "Rome"}',
    }
    assert end["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]


def test_usage_of_n_choices_counts_the_prompt_once() -> None:
    u = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert total_usage([u, u]) == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_error_event_becomes_an_openai_error() -> None:
    s = OpenAIStream(model="m", chat=False, include_usage=False)
    (err,) = chunks(s.translate({"error": {"code": "instance_failed", "message": "boom"}}))
    assert err["error"] == {"message": "boom", "type": "server_error", "param": None,
                            "code": "instance_failed"}  # fmt: skip


def test_non_stream_answers() -> None:
    native = {"id": "x", "text": "hi", "finish_reason": "stop",
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
    chat = openai_response([native], "m", chat=True)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert chat["usage"]["total_tokens"] == 2
    text = openai_response([native, native], "m", chat=False, echo="Q: ")
    assert text["object"] == "text_completion"
    assert [c["text"] for c in text["choices"]] == ["Q: hi", "Q: hi"]
    assert [c["index"] for c in text["choices"]] == [0, 1]
    assert text["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    called = openai_response([{**native, "text": '{"x": 1}'}], "m", chat=True, tool_call="f")
    message = called["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f"
    assert called["choices"][0]["finish_reason"] == "tool_calls"
