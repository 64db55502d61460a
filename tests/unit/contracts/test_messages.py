"""The wire contract: every message round-trips; anything malformed is a ProtocolError."""

from __future__ import annotations

import msgpack
import pytest

from sllm.errors import ProtocolError
from sllm.messages import (
    CacheEntryState,
    CmdReply,
    DeviceState,
    FunctionLoad,
    GatewayLoad,
    InstanceEvent,
    InstanceState,
    LeaseRecord,
    LoadCmd,
    LogLine,
    MigrateCmd,
    NodeHeartbeat,
    PrepareCmd,
    UnloadCmd,
    decode,
    decode_as,
    encode,
)

SAMPLES: list[object] = [
    LoadCmd("i-1", "chat", {"spec": {"name": "chat"}}, "cpu:0"),
    UnloadCmd("i-1", 5.0),
    MigrateCmd("i-1", "m-1", "node-b", "i-2", "http://127.0.0.1:1"),
    CmdReply(False, "not_found", "no such checkpoint", {"x": 1}),
    NodeHeartbeat(
        node_id="node-0",
        seq=3,
        devices=[DeviceState("cpu:0", "cpu", 1 << 30, None)],
        instances=[InstanceState("i-1", "chat", "cpu:0", "ready", "http://h:1", 2, 10, 5)],
        cache={"dram": [CacheEntryState("k", 100, True)], "ssd": []},
        bandwidths={"dram": 1e10, "ssd": 2e9},
        load_queue_s=0.5,
    ),
    InstanceEvent("ready", "i-1", "node-0", "chat", "http://h:1", tier="dram", load_s=0.2),
    LogLine("chat", "i-1", "node-0", "hello"),
    PrepareCmd("chat", {"spec": {"name": "chat"}, "requirements": "humanize\n"}),
    GatewayLoad("gw-a", 7, {"chat": FunctionLoad(3, 1)}),
    LeaseRecord("gw-a"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message


def test_decode_as_checks_the_type() -> None:
    payload = encode(UnloadCmd("i-1"))
    assert decode_as(payload, UnloadCmd).instance_id == "i-1"
    with pytest.raises(ProtocolError, match="expected load, got unload"):
        decode_as(payload, LoadCmd)


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj)
    return packed


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xc1\xff\x00", "malformed msgpack"),
        (_pack([1, 2]), "not a map"),
        (_pack({"v": 99, "type": "unload", "body": {}}), "unsupported message version 99"),
        (_pack({"v": 1, "type": "explode", "body": {}}), "unknown message type 'explode'"),
        (_pack({"v": 1, "type": "unload", "body": []}), "body is not a map"),
        (_pack({"v": 1, "type": "unload", "body": {}}), "missing field 'instance_id'"),
        (
            _pack({"v": 1, "type": "unload", "body": {"instance_id": 7}}),
            "instance_id: expected str",
        ),
        (
            _pack({"v": 1, "type": "unload", "body": {"instance_id": "a", "drain_s": "x"}}),
            "expected a number",
        ),
        (
            _pack({"v": 1, "type": "reply", "body": {"ok": 1}}),
            "ok: expected bool",
        ),
    ],
)
def test_malformed_payloads_are_rejected(payload: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert expected in str(info.value)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode({"not": "a message"})
