"""Stream splicing in the gateway: events pass through byte for byte, a ``migrated`` event is
swallowed and the stream continues from the target; failures end with a clear error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.migration.splice import MAX_MOVES, EventSplitter, follow_moves, migrated_body
from sllm.errors import Unavailable


def ev(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def moved(rid: str, address: str, output: list[int]) -> bytes:
    state = {"request_id": rid, "prompt_ids": [1], "output_ids": output, "params": {"seed": 1}}
    body = {"request_id": rid, "target_instance_id": "t", "target_address": address}
    return ev({"migrated": {**body, "state": state}})


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in stream])


def token(i: int) -> bytes:
    return ev({"delta": f"t{i}", "token_ids": [i]})


async def test_stream_without_move_passes_through_unchanged() -> None:
    raw = token(1) + token(2) + ev({"finish_reason": "length", "usage": {}}) + b"data: [DONE]\n\n"

    async def never(body: dict[str, Any]) -> AsyncIterator[bytes]:
        raise AssertionError("no move happened")

    # cut at awkward places: events are reassembled, bytes kept
    out = await collect(follow_moves(raw[:5], chunks(raw[5:31], raw[31:]), never))
    assert out == raw


async def test_move_continues_on_target_without_loss_or_repeat() -> None:
    opened: list[dict[str, Any]] = []

    async def resume(body: dict[str, Any]) -> AsyncIterator[bytes]:
        opened.append(body)
        return chunks(token(3), token(4), ev({"finish_reason": "stop"}), b"data: [DONE]\n\n")

    source = [token(1), token(2) + moved("r", "http://d", [1, 2]), b"data: ignored\n\n"]
    out = await collect(follow_moves(source[0], chunks(*source[1:]), resume))
    assert out == token(1) + token(2) + token(3) + token(4) + ev({"finish_reason": "stop"}) + (
        b"data: [DONE]\n\n"
    )
    assert opened[0]["target_address"] == "http://d"
    assert opened[0]["state"]["output_ids"] == [1, 2]


async def test_failed_resume_ends_with_migration_failed_error() -> None:
    async def resume(body: dict[str, Any]) -> AsyncIterator[bytes]:
        raise Unavailable("target and source are gone")

    out = await collect(follow_moves(token(1), chunks(moved("r", "http://d", [1])), resume))
    events = [json.loads(e[6:]) for e in out.decode().strip().split("\n\n")]
    assert events[0]["token_ids"] == [1]
    assert events[1]["error"]["code"] == "migration_failed"
    assert "gone" in events[1]["error"]["message"]


async def test_endless_moves_are_cut() -> None:
    async def resume(body: dict[str, Any]) -> AsyncIterator[bytes]:
        return chunks(moved("r", "http://d", [1]))

    out = await collect(follow_moves(b"", chunks(moved("r", "http://d", [1])), resume))
    assert b"migration_failed" in out and f"{MAX_MOVES} times".encode() in out


def test_splitter_and_detection() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a": 1}\r\n\r\ndata: x') == [b'data: {"a": 1}\r\n\r\n']
    assert splitter.rest() == b"data: x"
    assert migrated_body(token(1)) is None
    assert migrated_body(ev({"delta": 'the word "migrated" in text'})) is None
    assert migrated_body(moved("r", "http://d", []))["request_id"] == "r"  # type: ignore[index]
