"""Output constraints and tools of a request (OpenAI's shapes) -> sllm's ``structured``."""

from __future__ import annotations

from typing import Any

import pytest

from sllm.errors import InvalidInput
from sllm.structured import structured_output

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "clock"}}


def test_response_format() -> None:
    assert structured_output({}) is None
    assert structured_output({"response_format": {"type": "text"}}) is None
    assert structured_output({"response_format": {"type": "json_object"}}) == {
        "json_object": True, "source": "response_format"}  # fmt: skip
    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert structured_output({"response_format": fmt}) == {
        "json": schema, "source": "response_format"}  # fmt: skip


def test_forced_tool_calls() -> None:
    named = {"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function",
             "function": {"name": "weather"}}}  # fmt: skip
    assert structured_output(named) == {
        "json": WEATHER["function"]["parameters"], "source": "tool_choice"}  # fmt: skip
    required = structured_output({"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    assert required is not None and required["json"]["type"] == "array"
    names = [c["properties"]["name"]["enum"] for c in required["json"]["items"]["anyOf"]]
    assert names == [["weather"], ["clock"]]
    one = structured_output(
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    )
    assert one is not None and one["json"]["maxItems"] == 1
    assert structured_output({"tools": [WEATHER], "tool_choice": "none"}) is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tools": [WEATHER]}, "tool_choice: 'auto' (the default with tools)"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice: 'auto'"),
        ({"tool_choice": "required"}, "tool_choice: give tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "'x' is not one of the tools"),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]: expected"),
        ({"tools": [], "tool_choice": "required"}, "tools: expected a list of 1"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "schema: expected"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {
          "type": "json_object"}}, "a forced tool call is JSON already"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidInput, match=None) as err:
        structured_output(body)
    assert needle in err.value.message
