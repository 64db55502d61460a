"""The OpenAI surface through the real gateway to a function on the vLLM backend, driven by the
official ``openai`` client: each parameter sllm passes to vLLM has a visible effect, and one it
does not take is a 400 naming it. One vLLM engine for the module (one function, max 1)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.gateway.conftest import AUTH, Cluster

from .conftest import VllmNode, deploy

pytestmark = pytest.mark.integration

FN = "vtools"
CHAT = [{"role": "user", "content": "The capital of France is"}]
CITY = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(gateway: Cluster) -> Iterator[OpenAI]:
    deploy(gateway, FN, "vtools", backend="vllm", scale={"max": 1})
    with OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        c.chat.completions.create(model=FN, messages=CHAT, max_tokens=1)  # the cold start
        yield c


def _text(c: OpenAI, **kw: object) -> str:
    answer = c.chat.completions.create(model=FN, messages=CHAT, **kw)  # type: ignore[call-overload]
    return str(answer.choices[0].message.content)


def test_the_function_runs_on_vllm(client: OpenAI, gateway: Cluster) -> None:
    described = httpx.get(f"{gateway.url}/system/functions/{FN}", headers=AUTH, timeout=10).json()
    assert [i["backend"] for i in described["instances"]] == ["vllm"]


def test_stream_with_usage_equals_the_answer(client: OpenAI) -> None:
    kw = {"max_tokens": 12, "temperature": 0}
    answer = client.chat.completions.create(model=FN, messages=CHAT, **kw)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        model=FN, messages=CHAT, stream=True, stream_options={"include_usage": True}, **kw
    )  # type: ignore[call-overload]
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == answer.choices[0].message.content
    assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens  # type: ignore[union-attr]


def test_n_seed_and_temperature(client: OpenAI) -> None:
    kw = {"max_tokens": 16, "temperature": 1.0}
    answer = client.chat.completions.create(model=FN, messages=CHAT, n=2, seed=5, **kw)  # type: ignore[call-overload]
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1] and texts[0] != texts[1]
    again = client.chat.completions.create(model=FN, messages=CHAT, n=2, seed=5, **kw)  # type: ignore[call-overload]
    assert [c.message.content for c in again.choices] == texts  # seeded: reproducible
    assert _text(client, seed=6, **kw) != texts[0]


def test_logprobs_and_top_logprobs(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=FN, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        tops = [t.logprob for t in token.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert token.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy: the best one
    completion = client.completions.create(
        model=FN, prompt="The capital", max_tokens=4, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.token_logprobs or []) == 4
    assert all(len(t) <= 2 for t in logprobs.top_logprobs or [])


def test_echo_and_stop(client: OpenAI) -> None:
    full = client.completions.create(model=FN, prompt="Hello", max_tokens=20, temperature=0)
    text = full.choices[0].text
    echoed = client.completions.create(
        model=FN, prompt="Hello", max_tokens=20, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Hello" + text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=FN, prompt="Hello", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_presence_and_frequency_penalties_change_the_output(client: OpenAI) -> None:
    plain = _text(client, max_tokens=48, temperature=0)
    assert _text(client, max_tokens=48, temperature=0, frequency_penalty=2.0) != plain
    assert _text(client, max_tokens=48, temperature=0, presence_penalty=2.0) != plain


def test_response_format_json(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}}
    text = _text(client, max_tokens=32, temperature=0, response_format=fmt)
    assert json.loads(text)["answer"] in ("yes", "no")
    loose = _text(client, max_tokens=8, temperature=0, response_format={"type": "json_object"})
    assert loose.startswith("{")  # an object being written (it may be cut by max_tokens)


def test_forced_tool_calls(client: OpenAI) -> None:
    named = client.chat.completions.create(
        model=FN, messages=CHAT, max_tokens=32, temperature=0, tools=[CITY],
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )  # type: ignore[call-overload]  # fmt: skip
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    stream = client.chat.completions.create(
        model=FN, messages=CHAT, max_tokens=48, temperature=0, tools=[CITY],
        tool_choice="required", stream=True,
    )  # type: ignore[call-overload]  # fmt: skip
    calls, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            calls.extend(c.delta.tool_calls or [])
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and calls
    assert all(c.function and c.function.name == "weather" for c in calls)


def test_what_sllm_does_not_take_is_a_400_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=FN, messages=CHAT, logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="tool_choice: 'auto'"):
        client.chat.completions.create(model=FN, messages=CHAT, tools=[CITY])  # type: ignore[list-item]


def _transformers_embedding(hf_dir: object, text: str) -> list[float]:
    """Last-token final hidden state of the checkpoint in transformers, L2 normalised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
        return [float(v) for v in torch.nn.functional.normalize(hidden, dim=0)]


def test_embeddings_of_an_embedding_function(
    client: OpenAI, gateway: Cluster, vllm_node: VllmNode
) -> None:
    deploy(gateway, "vembed", "vtiny", backend="vllm", handler="embedding", scale={"max": 1})
    answer = client.embeddings.create(model="vembed", input=["hello world", "Paris"])
    assert [d.index for d in answer.data] == [0, 1]
    vectors = [d.embedding for d in answer.data]
    assert all(len(v) == 128 for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors)  # normalised
    reference = _transformers_embedding(vllm_node.hf_dirs["vtiny"], "hello world")
    assert sum(a * b for a, b in zip(vectors[0], reference, strict=True)) > 0.999
    floats = client.embeddings.create(model="vembed", input="Paris", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[1], abs=1e-5)
    assert answer.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="is an embedding function"):
        client.chat.completions.create(model="vembed", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="not an embedding one"):
        client.embeddings.create(model=FN, input="x")
