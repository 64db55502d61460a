"""function.yaml parsing: what a user writes, and the errors they see when it is wrong."""

from __future__ import annotations

import pytest

from sllm.errors import ValidationFailed
from sllm.spec import FunctionRecord, FunctionSpec, parse_spec_dict, parse_spec_yaml

FULL = """\
name: chat
model: s3://models/smollm2
handler: chat
resources: {accelerators: 1, memory: 2Gi}
scale: {min: 0, max: 4, target_concurrency: 4, keep_alive: 60s}
generation: {max_tokens: 256, temperature: 0.7}
env: {GREETING: hi}
"""


def test_full_spec_parses_with_units() -> None:
    spec = parse_spec_yaml(FULL)
    assert spec.name == "chat"
    assert spec.resources.memory_bytes == 2 * 2**30
    assert spec.scale.keep_alive_s == 60.0
    assert spec.generation.temperature == 0.7
    assert spec.env == {"GREETING": "hi"}


def test_defaults_fill_missing_sections() -> None:
    spec = parse_spec_yaml("name: a\nmodel: ./m\n")
    assert spec.handler == "chat"
    assert spec.scale.max == 4 and spec.scale.min == 0


def test_internal_round_trip() -> None:
    spec = parse_spec_yaml(FULL)
    assert FunctionSpec.from_dict(spec.to_dict()) == spec
    record = FunctionRecord(spec, "checkpoints/chat/abc", 123, 2, {"h.py": "x = 1\n"})
    assert FunctionRecord.from_dict(record.to_dict()) == record
    assert record.bump(spec, "checkpoints/chat/def", 5).revision == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: Chat_1\nmodel: m\n", "not a DNS-1123 label"),
        ("name: chat\nmodel: m\nfoo: 1\n", "foo (line 3): unknown key"),
        ("name: chat\nmodel: m\nscale:\n  max: lots\n", "scale.max (line 4): expected int"),
        ("name: chat\nmodel: m\nscale: {min: 5, max: 2}\n", "greater than max"),
        ("name: chat\nmodel: m\nscale: {keep_alive: soon}\n", "scale.keep_alive (line 3)"),
        ("name: chat\nmodel: m\ngeneration: {temperature: 9}\n", "must be in [0.0, 2.0]"),
        ("name: chat\nmodel: m\nresources: {memory: lots}\n", "resources.memory"),
        ("name: chat\nmodel: m\nresources: {gpus: 1}\n", "resources.gpus (line 3): unknown key"),
        ("name: chat\nmodel: m\nhandler: 'not a handler'\n", "handler (line 3)"),
        ("name: chat\n", "model: required key is missing"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("name: [unclosed\n", "not valid YAML"),
        ("", "empty file"),
        ("name: chat\nmodel: m\nscale: {max: true}\n", "expected int"),
    ],
)
def test_bad_specs_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_spec_yaml(text)
    assert expected in str(info.value)
    assert str(info.value).startswith("function.yaml:")


def test_json_spec_validation() -> None:
    spec = parse_spec_dict({"name": "x", "model": "m", "scale": {"keep_alive": "5s"}})
    assert spec.scale.keep_alive_s == 5.0
    with pytest.raises(ValidationFailed, match="spec: expected a JSON object"):
        parse_spec_dict([1, 2])


def test_custom_handler_reference_is_accepted() -> None:
    spec = parse_spec_yaml("name: a\nmodel: m\nhandler: handler:handle\n")
    assert spec.handler == "handler:handle"


def test_auth_is_private_unless_public() -> None:
    assert parse_spec_yaml("name: a\nmodel: m\n").auth == "private"
    assert parse_spec_yaml("name: a\nmodel: m\nauth: public\n").auth == "public"
    # a record stored before the field existed is private too
    assert FunctionSpec.from_dict({"name": "a", "model": "m"}).auth == "private"
    spec = parse_spec_dict({"name": "a", "model": "m", "auth": "public"})
    assert FunctionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValidationFailed, match=r"auth \(line 3\): expected 'public' or 'private'"):
        parse_spec_yaml("name: a\nmodel: m\nauth: open\n")


def test_backend_defaults_to_auto_and_round_trips() -> None:
    assert parse_spec_yaml("name: a\nmodel: ./m\n").backend == "auto"
    spec = parse_spec_yaml("name: a\nmodel: ./m\nbackend: vllm\n")
    assert spec.backend == "vllm"
    assert FunctionSpec.from_dict(spec.to_dict()) == spec


def test_unknown_backend_is_named_with_its_line() -> None:
    with pytest.raises(ValidationFailed, match=r"backend \(line 3\): expected one of auto, vllm"):
        parse_spec_yaml("name: a\nmodel: ./m\nbackend: tensorrt\n")
