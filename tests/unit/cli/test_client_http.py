"""The gateway client against scripted HTTP answers: typed errors, streams, a dead gateway."""

from __future__ import annotations

import json

import httpx
import pytest

from sllm.errors import Conflict, NotFound, Overloaded, SllmError, Unauthorized, Unavailable
from sllm_cli.client import ClientConfig, Event, GatewayClient
from sllm_cli.servers import free_port

URL = "http://gw.test"


def client_for(handler: httpx.MockTransport, token: str = "tok") -> GatewayClient:
    return GatewayClient(ClientConfig(URL, token), transport=handler)


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def test_sends_bearer_token_and_parses_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[{"name": "chat"}])

    with client_for(httpx.MockTransport(handler)) as client:
        assert client.functions() == [{"name": "chat"}]
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert seen[0].url.path == "/system/functions"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(404, "not_found", NotFound), (409, "conflict", Conflict), (429, "overloaded", Overloaded)],
)
def test_error_bodies_become_typed_errors(status: int, code: str, cls: type[SllmError]) -> None:
    transport = httpx.MockTransport(lambda r: error(status, code, f"function 'x': {code}"))
    with client_for(transport) as client, pytest.raises(cls) as info:
        client.function("x")
    assert info.value.message == f"function 'x': {code}"


def test_exists_is_false_on_404_only() -> None:
    transport = httpx.MockTransport(lambda r: error(404, "not_found", "no"))
    with client_for(transport) as client:
        assert client.exists("x") is False
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"name": "x"}))
    with client_for(transport) as client:
        assert client.exists("x") is True


def test_401_says_how_to_fix_the_token() -> None:
    transport = httpx.MockTransport(lambda r: error(401, "unauthorized", "bad token"))
    with client_for(transport) as client, pytest.raises(Unauthorized) as info:
        client.functions()
    assert "--token" in info.value.message and "SLLM_TOKEN" in info.value.message


def test_non_json_error_still_reads_well() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(502, text="<html>bad gateway"))
    with client_for(transport) as client, pytest.raises(SllmError, match="502"):
        client.info()


def test_no_gateway_says_so_and_how_to_start_one() -> None:
    config = ClientConfig(f"http://127.0.0.1:{free_port()}", "")
    with GatewayClient(config) as client, pytest.raises(Unavailable) as info:
        client.functions()
    assert config.url in info.value.message and "sllm up" in info.value.message
    with GatewayClient(config) as client:
        assert client.healthy() is False


def sse(*events: object) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def test_invoke_streams_deltas_until_done() -> None:
    body = sse(
        {"delta": "Par", "token_ids": [1]},
        {"delta": "is", "token_ids": [2]},
        {"finish_reason": "stop", "usage": {}},
        "[DONE]",
        {"delta": "after done is ignored"},
    )
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with client_for(httpx.MockTransport(handler)) as client:
        events = list(client.invoke("chat", {"prompt": "x", "stream": True}))
    assert events == [Event(delta="Par"), Event(delta="is"), Event(finish_reason="stop")]
    assert seen == [{"prompt": "x", "stream": True}]


def test_error_mid_stream_raises_after_the_tokens_so_far() -> None:
    body = sse({"delta": "a"}, {"error": {"code": "unavailable", "message": "instance died"}})
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    got: list[Event] = []
    with client_for(transport) as client, pytest.raises(Unavailable, match="instance died"):
        for event in client.invoke("chat", {}):
            got.append(event)
    assert got == [Event(delta="a")]


def test_invoke_json_answer_and_error_before_stream() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"text": "hi"}))
    with client_for(transport) as client:
        assert list(client.invoke("chat", {})) == [Event(json={"text": "hi"})]
    transport = httpx.MockTransport(lambda r: error(404, "not_found", "function 'nope' not found"))
    with client_for(transport) as client, pytest.raises(NotFound, match="nope"):
        list(client.invoke("nope", {}))


def test_printing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from sllm_cli.fn import print_events

    print_events([Event(delta="Par"), Event(delta="is"), Event(finish_reason="stop")], False)
    assert capsys.readouterr().out == "Paris\n"
    print_events([Event(delta="line\n")], False)
    assert capsys.readouterr().out == "line\n"
    print_events([Event(json={"text": "whole", "usage": {}})], False)
    assert capsys.readouterr().out == "whole\n"
    print_events([Event(json={"summary": "s", "n": 1})], True)
    assert json.loads(capsys.readouterr().out) == {"summary": "s", "n": 1}


def test_invoke_sends_the_key_else_the_token_and_explains_a_401() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization") == "Bearer bad":
            return error(401, "unauthorized", "function 'x': the key is not valid")
        return httpx.Response(200, json={"text": "ok"})

    transport = httpx.MockTransport(handler)
    with GatewayClient(ClientConfig(URL, "tok", "k1"), transport=transport) as client:
        assert list(client.invoke("x", {})) == [Event(json={"text": "ok"})]
    with GatewayClient(ClientConfig(URL, "tok"), transport=transport) as client:
        list(client.invoke("x", {}))
    assert seen == ["Bearer k1", "Bearer tok"]
    with (
        GatewayClient(ClientConfig(URL, "tok", "bad"), transport=transport) as client,
        pytest.raises(Unauthorized) as info,
    ):
        list(client.invoke("x", {}))
    assert "the key is not valid" in info.value.message and "--key" in info.value.message
