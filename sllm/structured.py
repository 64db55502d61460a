"""Output constraints and tools of a request body (OpenAI's shapes), validated: by the
gateway at the edge and by the instance that runs the request (pure, no torch).

``response_format`` (``json_object`` or ``json_schema``) and a forced ``tool_choice``
(``required`` or a named function) become one output constraint, ``structured``:
``{"json": <schema>, "source": <field>}`` or ``{"json_object": true, "source": ...}``. A
backend with guided decoding (vLLM) honours it; one without refuses the request naming the
field. A forced tool call is generated as JSON: the arguments of the named function, or for
``required`` an array of ``{"name", "parameters"}``; the gateway turns that JSON into
``tool_calls``. ``tools`` are rendered into the prompt by the model's chat template.

``tool_choice: auto`` (OpenAI's default when tools are given) would need the model family's
own tool-call syntax parsed out of free text; sllm does not parse it and says so (400).
"""

from __future__ import annotations

from typing import Any

from sllm.errors import InvalidInput

MAX_TOOLS = 128


def tools_field(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The body's ``tools``, checked (1-128 function tools, each named, with a schema); None
    when there are none."""
    raw = body.get("tools")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOLS:
        raise InvalidInput(f"tools: expected a list of 1 to {MAX_TOOLS} function tools")
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidInput(f"tools[{i}]: expected {{'type': 'function', 'function': ...}}")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidInput(f"tools[{i}].function.name: expected a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput(f"tools[{i}].function.parameters: expected a JSON schema object")
    return raw


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters") or {"type": "object"}
    return dict(params)


def structured_output(body: dict[str, Any]) -> dict[str, Any] | None:
    """The output constraint of ``body`` (None: free text); InvalidInput names a bad field."""
    tools = tools_field(body)
    forced = _tool_choice(body, tools)
    fmt = _response_format(body.get("response_format"))
    if forced is not None and fmt is not None:
        raise InvalidInput("response_format, tool_choice: a forced tool call is JSON already")
    return forced or fmt


def _response_format(raw: object) -> dict[str, Any] | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True, "source": "response_format"}
    if kind == "json_schema":
        assert isinstance(raw, dict)
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInput("response_format.json_schema.schema: expected a JSON schema object")
        return {"json": schema, "source": "response_format"}
    raise InvalidInput(
        f"response_format.type: expected 'text', 'json_object' or 'json_schema', got {kind!r}"
    )


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidInput("tool_choice: give tools to choose from")
        return None
    if choice is None or choice == "auto":
        raise InvalidInput(
            "tool_choice: 'auto' (the default with tools) needs the model's own tool-call "
            "syntax parsed out of free text, which sllm does not do; set tool_choice to "
            "'required', to {'type': 'function', 'function': {'name': ...}} or to 'none'"
        )
    if choice == "none":
        return None
    if choice == "required":
        one = body.get("parallel_tool_calls") is False
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "parameters": _parameters(t),
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if one:
            schema["maxItems"] = 1
        return {"json": schema, "source": "tool_choice"}
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not name:
        raise InvalidInput(
            "tool_choice: expected 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}"
        )
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise InvalidInput(f"tool_choice.function.name: {name!r} is not one of the tools")
    return {"json": _parameters(named[0]), "source": "tool_choice"}
