"""Each bad input gets its status and a message naming what was wrong, and never reaches a
node (no load command, no instance request)."""

from __future__ import annotations

import pytest

from tests.unit.gateway.conftest import AUTH, Harness

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/function/nope", {"prompt": "x"}, 404, "'nope' is not deployed"),
        (CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "'nope'"),
        ("/function/chat", b'{"prompt": ', 400, "invalid JSON: Expecting value at line 1"),
        (CHAT, b"{not json", 400, "invalid JSON"),
        ("/function/chat", b"", 400, "body is empty"),
        ("/function/chat", [1, 2], 400, "must be a JSON object"),
        ("/function/chat", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ("/function/chat", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        (
            "/function/chat",
            {"prompt": "x", "max_tokens": "9"},
            400,
            "max_tokens: expected an integer",
        ),
        ("/function/chat", {"prompt": "x", "temperature": 3}, 400, "temperature"),
        ("/function/chat", {"prompt": "x", "temperature": True}, 400, "temperature"),
        ("/function/chat", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/function/chat", {"prompt": "x", "stop": [1]}, 400, "stop"),
        ("/function/chat", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/function/chat", {"prompt": 5}, 400, "prompt: expected a string"),
        ("/function/chat", {"messages": []}, 400, "messages: must contain at least one"),
        ("/function/chat", {"prompt": "x", "bogus": 1}, 400, "bogus: unknown field"),
        (CHAT, {"model": "chat", "messages": []}, 400, "messages: must contain at least one"),
        (CHAT, {"model": "chat", "messages": "hi"}, 400, "messages: expected a list"),
        (
            CHAT,
            {"model": "chat", "messages": [{"role": "bot", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        (
            CHAT,
            {"model": "chat", "messages": [{"role": "user", "content": 3}]},
            400,
            "messages[0].content",
        ),
        (
            CHAT,
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            CHAT,
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 17},
            400,
            "n: must be between 1 and 16",
        ),
        (  # never ignored: a parameter sllm does not handle is named
            CHAT,
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "logit_bias": {}},
            400,
            "logit_bias: not a parameter sllm supports",
        ),
        (
            CHAT,
            {"model": "chat", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs: needs logprobs: true",
        ),
        (
            CHAT,
            {
                "model": "chat",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            400,
            "tool_choice: 'auto' (the default with tools)",
        ),
        (
            CHAT,
            {
                "model": "chat",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "xml"},
            },
            400,
            "response_format.type: expected",
        ),
        (
            "/v1/completions",
            {"model": "chat", "prompt": "x", "echo": True, "logprobs": 1},
            400,
            "echo: with logprobs",
        ),
        ("/v1/completions", {"model": "chat", "prompt": "x", "suffix": "y"}, 400, "suffix: not a"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400, "model: expected"),
        ("/v1/completions", {"model": "chat", "prompt": None}, 400, "prompt: expected a string"),
    ],
)
async def test_bad_invocations(
    h: Harness, path: str, body: object, status: int, needle: str
) -> None:
    await h.deploy()
    if isinstance(body, bytes):
        r = await h.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = await h.client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    if path.startswith("/v1/"):
        assert {"message", "type", "param", "code"} <= set(error)
    assert not h.node.loads and not h.instances.seen


async def test_a_body_over_the_limit_is_413(h: Harness) -> None:
    await h.deploy()
    big = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    r = await h.client.post("/function/chat", content=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(70):
            yield b"x" * 1000

    r = await h.client.post("/function/chat", content=chunks())  # no Content-Length
    assert r.status_code == 413
    assert not h.node.loads and not h.instances.seen


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"name": "Bad_Name", "model": "m"}, "spec.name"),
        ({"name": "ok", "model": "m", "scale": {"min": 3, "max": 1}}, "spec.scale.min"),
        ({"name": "ok", "model": "m", "scale": {"keep_alive": "soon"}}, "spec.scale.keep_alive"),
        ({"name": "ok", "model": "m", "resources": {"memory": "lots"}}, "spec.resources.memory"),
        (
            {"name": "ok", "model": "m", "generation": {"temperature": 9}},
            "spec.generation.temperature",
        ),
        ({"name": "ok", "model": "m", "colour": "red"}, "spec.colour"),
        ({"name": "ok"}, "spec.model"),
    ],
)
async def test_an_invalid_spec_is_422_naming_the_field(
    h: Harness, spec: dict[str, object], needle: str
) -> None:
    body = {"spec": spec, "checkpoint": "k", "checkpoint_bytes": 1}
    r = await h.client.post("/system/functions", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_failed"
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"spec": {"name": "ok", "model": "m"}, "checkpoint_bytes": 1}, "checkpoint:"),
        (
            {"spec": {"name": "ok", "model": "m"}, "checkpoint": "k", "checkpoint_bytes": -1},
            "checkpoint_bytes",
        ),
        (
            {
                "spec": {"name": "ok", "model": "m"},
                "checkpoint": "k",
                "checkpoint_bytes": 1,
                "handler_source": {"../x.py": ""},
            },
            "handler_source",
        ),
        ({"checkpoint": "k", "checkpoint_bytes": 1}, "spec:"),
    ],
)
async def test_an_invalid_record_is_422(h: Harness, body: dict[str, object], needle: str) -> None:
    r = await h.client.post("/system/functions", json=body, headers=AUTH)
    assert r.status_code == 422 and needle in r.json()["error"]["message"]


async def test_unknown_routes_and_methods(h: Harness) -> None:
    r = await h.client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await h.client.get("/function/chat")
    assert r.status_code == 405
