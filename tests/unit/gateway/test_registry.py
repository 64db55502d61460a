"""The registry over a KeyValue bucket."""

from __future__ import annotations

import pytest

from gateway.registry import Registry
from sllm.bus import MemoryKeyValue
from sllm.errors import Conflict, NotFound, ValidationFailed
from sllm.spec import FunctionRecord, FunctionSpec


def record(name: str = "chat", checkpoint: str = "k1") -> FunctionRecord:
    return FunctionRecord(
        FunctionSpec(name=name, model="m"), checkpoint, 10, handler_source={"a.py": "x"}
    )


async def test_create_update_delete_and_reload() -> None:
    kv = MemoryKeyValue()
    reg = Registry(kv)
    await reg.create(record())
    with pytest.raises(Conflict):
        await reg.create(record())
    updated = await reg.update(
        "chat", FunctionRecord(FunctionSpec(name="chat", model="m2"), "k2", 20)
    )
    assert (updated.revision, updated.checkpoint, updated.handler_source) == (2, "k2", {})
    with pytest.raises(ValidationFailed, match="does not match"):
        await reg.update("chat", record("other"))
    again = Registry(kv)
    await again.load()
    assert again.get("chat") == updated
    await again.delete("chat")
    with pytest.raises(NotFound):
        again.get("chat")
    assert await kv.keys() == []


async def test_an_unreadable_record_is_skipped_not_fatal() -> None:
    kv = MemoryKeyValue()
    await Registry(kv).create(record("good"))
    await kv.put("fn.bad", b"{not json")
    await kv.put("fn.worse", b'{"spec": {"name": "Bad Name", "model": "m"}}')
    reg = Registry(kv)
    await reg.load()
    assert [r.spec.name for r in reg.all()] == ["good"]
