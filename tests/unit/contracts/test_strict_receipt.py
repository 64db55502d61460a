"""Typed contracts are strict on receipt: an unknown field, an unknown event kind or instance
state, and a load spec of another version are refused with a ProtocolError naming them."""

from __future__ import annotations

import msgpack
import pytest

from runtime.instance.load_spec import LOAD_SPEC_VERSION, LoadSpec
from sllm.errors import ProtocolError
from sllm.messages import decode


def _pack(body: dict[str, object], kind: str) -> bytes:
    packed: bytes = msgpack.packb({"v": 1, "type": kind, "body": body})
    return packed


EVENT = {"kind": "ready", "instance_id": "i", "node_id": "n", "function": "f"}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            _pack({"instance_id": "a", "drain": 3, "zz": 1}, "unload"),
            "unknown field(s) 'drain', 'zz'",
        ),
        (_pack({**EVENT, "kind": "exploded"}, "instance_event"), "kind: 'exploded' is not one of"),
        (
            _pack(
                {
                    "node_id": "n",
                    "seq": 1,
                    "devices": [],
                    "cache": {},
                    "bandwidths": {},
                    "instances": [
                        {
                            "instance_id": "i",
                            "function": "f",
                            "device": "cpu:0",
                            "state": "serving",
                            "address": None,
                            "in_flight": 0,
                        }
                    ],
                },
                "heartbeat",
            ),
            "state: 'serving' is not one of",
        ),
    ],
)
def test_wire_messages_refuse_what_they_do_not_know(payload: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert expected in str(info.value)


SPEC = LoadSpec("i-1", "chat", "chat", "/cache/e", "cpu:0", env={"A": "1"}, secret="s")


def test_load_spec_round_trips_with_its_version() -> None:
    line = SPEC.to_json()
    assert line["cmd"] == "load" and line["v"] == LOAD_SPEC_VERSION
    assert LoadSpec.from_json(line) == SPEC


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"max_batch_size": 8}, "load spec: unknown field(s) 'max_batch_size'"),
        ({"v": LOAD_SPEC_VERSION + 1}, f"unsupported version {LOAD_SPEC_VERSION + 1}"),
        ({"threads": "4"}, "load spec.threads: expected an integer"),
        ({"cmd": "premap"}, "not a load command"),
    ],
)
def test_load_spec_refuses_what_it_does_not_know(change: dict[str, object], expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        LoadSpec.from_json({**SPEC.to_json(), **change})
    assert expected in str(info.value)


def test_load_spec_without_required_fields_names_them() -> None:
    line = SPEC.to_json()
    del line["entry_dir"]
    with pytest.raises(ProtocolError, match="missing field 'entry_dir'"):
        LoadSpec.from_json(line)
