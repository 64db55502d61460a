"""The OpenAI-compatible API, driven by the official ``openai`` client (over the in-process
transport; tests/integration/gateway drives it over a real socket and node)."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from tests.unit.gateway.conftest import Harness


def client(h: Harness) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url="http://gateway/v1",
        api_key="unused",
        http_client=httpx.AsyncClient(transport=h.client._transport),
        max_retries=0,
    )


async def test_models_lists_functions(h: Harness) -> None:
    await h.deploy("chat")
    await h.deploy("other")
    models = await client(h).models.list()
    assert sorted(m.id for m in models.data) == ["chat", "other"]


async def test_chat_completion_with_usage(h: Harness) -> None:
    await h.deploy()
    answer = await client(h).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content == "echo: hi"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens == 5
    _, path, sent = h.instances.seen[-1]
    assert path == "/v1/generate"
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 8 and sent["temperature"] == 0.0 and sent["stream"] is False


async def test_chat_completion_stream_with_usage(h: Harness) -> None:
    await h.deploy()
    stream = await client(h).chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "a b"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasons, usage = "", [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert text == "echo: a b "
    assert reasons[-1] == "stop"
    assert usage is not None and usage.completion_tokens == 2


async def test_completions_stream_and_not(h: Harness) -> None:
    await h.deploy()
    c = client(h)
    answer = await c.completions.create(model="chat", prompt="once", max_tokens=4)
    assert answer.choices[0].text == "echo: once"
    stream = await c.completions.create(model="chat", prompt="x y", stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == "echo: x y "


async def test_openai_errors_surface_in_the_client(h: Harness) -> None:
    await h.deploy()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client(h).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await client(h).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], temperature=5
        )


async def test_a_broken_stream_surfaces_as_an_error_in_the_client(h: Harness) -> None:
    await h.deploy()
    await h.client.post("/function/chat", json={"prompt": "warm"})
    (inst,) = h.gateway.table.routable("chat")
    h.instances.break_stream.add(inst.instance_id)
    stream = await client(h).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError, match="stopped before the answer was complete"):
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
    assert text == "echo: "


async def test_n_choices_are_n_instance_requests_with_their_own_seeds(h: Harness) -> None:
    await h.deploy()
    c = client(h)
    answer = await c.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a"}], n=3, seed=7
    )
    assert [ch.index for ch in answer.choices] == [0, 1, 2]
    assert all(ch.message.content == "echo: a" for ch in answer.choices)
    seeds = [sent["seed"] for _, path, sent in h.instances.seen[-3:] if path == "/v1/generate"]
    assert seeds == [7, 8, 9]
    one = await c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "a"}])
    assert answer.usage is not None and one.usage is not None
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert answer.usage.completion_tokens == 3 * one.usage.completion_tokens
    stream = await c.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "x y"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {0: "", 1: ""}
    reasons: dict[int, str | None] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason
    assert texts == {0: "echo: x y ", 1: "echo: x y "}
    assert reasons == {0: "stop", 1: "stop"}
    assert usage is not None and usage.completion_tokens == 2 * 2  # two words a choice


async def test_echo_prepends_the_prompt(h: Harness) -> None:
    await h.deploy()
    answer = await client(h).completions.create(model="chat", prompt="hi", echo=True)
    assert answer.choices[0].text == "hiecho: hi"
