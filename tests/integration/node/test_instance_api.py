"""The Instance HTTP API in process (ASGI) over the tiny model: bodies, errors, streaming,
draining, and resuming an exported request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from runtime.engine.sampling import SamplingDefaults
from runtime.instance.handlers import HandlerContext
from runtime.instance.server import InstanceService, build_app


@pytest.fixture(scope="module")
def engine_parts(tiny_model_dir: Path) -> Iterator[tuple[TransformersBackend, Tokenizing]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    engine = TransformersBackend(model, tok.decode, eos_ids=[tokenizer.eos_token_id])
    engine.start()
    yield engine, tok
    engine.stop()


@pytest.fixture
async def api(
    engine_parts: tuple[TransformersBackend, Tokenizing],
) -> AsyncIterator[tuple[httpx.AsyncClient, InstanceService]]:
    engine, tok = engine_parts
    defaults = SamplingDefaults(max_tokens=8, temperature=0.0)
    service = InstanceService(
        function="tiny",
        instance_id="i-1",
        handler="chat",
        engine=engine,
        tok=tok,
        defaults=defaults,
        context=HandlerContext(engine, tok, defaults, {}),
        state="ready",
    )
    transport = httpx.ASGITransport(app=build_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://instance") as http:
        yield http, service


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_generate_prompt_and_messages(api: tuple[httpx.AsyncClient, InstanceService]) -> None:
    http, _ = api
    out = (await http.post("/v1/generate", json={"prompt": "hello", "request_id": "r-1"})).json()
    assert out["id"] == "r-1" and out["usage"]["completion_tokens"] <= 8
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = await http.post("/v1/invoke", json=chat)
    assert reply.status_code == 200 and reply.json()["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "exactly one of 'prompt'"),
        (b'{"prompt": "a", "messages": []}', "exactly one of 'prompt'"),
        (b'{"prompt": ""}', "prompt"),
        (b'{"messages": [{"role": "user"}]}', "messages[0].content"),
        (b'{"prompt": "a", "stream": "yes"}', "stream"),
        (b'{"prompt": "a", "top_p": 3}', "top_p"),
        (b'{"prompt": "a", "request_id": "a b"}', "request_id"),
    ],
)
async def test_bad_bodies_get_400_naming_the_field(
    api: tuple[httpx.AsyncClient, InstanceService], body: bytes, needle: str
) -> None:
    http, _ = api
    reply = await http.post("/v1/generate", content=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_input"
    assert needle in reply.json()["error"]["message"]


async def test_stream_events_follow_the_contract(
    api: tuple[httpx.AsyncClient, InstanceService],
) -> None:
    http, _ = api
    body = {"prompt": "The capital", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = (await http.post("/v1/generate", json=body)).json()
    reply = await http.post("/v1/generate", json=body | {"stream": True})
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"finish_reason": "length", "usage": plain["usage"]}
    tokens = events[:-2]
    assert len(tokens) == 6 and all(len(e["token_ids"]) == 1 for e in tokens)
    assert "".join(e["delta"] for e in tokens) == plain["text"]


async def test_draining_instance_refuses_with_503(
    api: tuple[httpx.AsyncClient, InstanceService],
) -> None:
    http, service = api
    assert await service.drain(0.5)
    health = await http.get("/healthz")
    assert health.status_code == 503 and health.json()["state"] == "draining"
    reply = await http.post("/v1/generate", json={"prompt": "x"})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"


async def test_resume_continues_an_exported_request_identically(
    api: tuple[httpx.AsyncClient, InstanceService],
) -> None:
    http, service = api
    body = {"prompt": "hello world", "max_tokens": 14, "temperature": 0.8, "seed": 99}
    events = sse_events((await http.post("/v1/generate", json=body | {"stream": True})).text)
    tokens = events[:-2]
    ids = [e["token_ids"][0] for e in tokens]
    full_text = "".join(e["delta"] for e in tokens)
    head_text = "".join(e["delta"] for e in tokens[:5])
    state = {
        "request_id": "moved-1",
        "prompt_ids": service.tok.encode("hello world", special=True),
        "output_ids": ids[:5],
        "params": {"max_tokens": 14, "temperature": 0.8, "top_p": 1.0, "seed": 99},
        "emitted_chars": len(head_text),
    }
    resumed = sse_events((await http.post("/v1/migration/resume", json={"state": state})).text)
    rest = resumed[:-2]
    assert [e["token_ids"][0] for e in rest] == ids[5:]
    assert head_text + "".join(e["delta"] for e in rest) == full_text
    assert resumed[-2]["usage"]["completion_tokens"] == 14
    bad = await http.post("/v1/migration/resume", json={"state": {"request_id": "x"}})
    assert bad.status_code == 400 and "missing field" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_transformers_backend_refuses_what_it_cannot_honour(
    api: tuple[httpx.AsyncClient, InstanceService], extra: dict[str, Any], named: str, stream: bool
) -> None:
    """Never ignored: a 400 naming the field (streams too: before any event is sent)."""
    http, _ = api
    body = {"prompt": "hello", "stream": stream, **extra}
    reply = await http.post("/v1/generate", json=body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith(f"{named}: this function runs on the transformers backend")


async def test_embeddings_on_the_transformers_backend(
    engine_parts: tuple[TransformersBackend, Tokenizing], tiny_model_dir: Path
) -> None:
    """An embedding function's instance: ``/v1/embed`` gives the last token's final hidden
    state, normalised, as transformers computes it; generation is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    engine, tok = engine_parts
    defaults = SamplingDefaults()
    service = InstanceService("emb", "i-2", "embedding", engine, tok, defaults,
                              HandlerContext(engine, tok, defaults, {}), state="ready")  # fmt: skip
    transport = httpx.ASGITransport(app=build_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://instance") as http:
        out = (await http.post("/v1/embed", json={"input": ["hello", "hello world"]})).json()
        refused = await http.post("/v1/generate", json={"prompt": "x"})
        bad = await http.post("/v1/embed", json={"input": [""]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([tok.encode("hello world", special=True)])
        last = model.base_model(input_ids=ids).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(last, dim=0).tolist()
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][1]["embedding"] == pytest.approx(expected, abs=1e-5)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0
    assert refused.status_code == 400 and "embedding function" in refused.json()["error"]["message"]
    assert bad.status_code == 400 and "input[0]" in bad.json()["error"]["message"]
