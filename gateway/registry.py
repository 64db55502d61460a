"""The function registry: ``FunctionRecord``s in a KeyValue bucket (JetStream KV in production),
so a gateway restart loses nothing. An in-memory copy serves reads on the request path; every
write goes to the bucket first."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from sllm.bus import KeyValue
from sllm.errors import Conflict, NotFound, ValidationFailed
from sllm.spec import FunctionRecord

log = logging.getLogger(__name__)

BUCKET = "sllm-functions"
_PREFIX = "fn."


class Registry:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._records: dict[str, FunctionRecord] = {}

    async def load(self) -> None:
        """Read every record from the bucket (at start). A record that no longer parses is
        skipped with a log line rather than taking the gateway down."""
        records: dict[str, FunctionRecord] = {}
        for key in await self._kv.keys():
            if not key.startswith(_PREFIX):
                continue
            raw = await self._kv.get(key)
            if raw is None:
                continue
            try:
                record = FunctionRecord.from_dict(json.loads(raw))
            except (ValueError, ValidationFailed) as exc:
                log.warning("registry: skipping unreadable record key=%s error=%s", key, exc)
                continue
            records[record.spec.name] = record
        self._records = records

    def get(self, name: str) -> FunctionRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFound(f"function {name!r} is not deployed")
        return record

    def find(self, name: str) -> FunctionRecord | None:
        return self._records.get(name)

    def all(self) -> list[FunctionRecord]:
        return [self._records[name] for name in sorted(self._records)]

    async def create(self, record: FunctionRecord) -> FunctionRecord:
        name = record.spec.name
        if name in self._records or await self._kv.get(_PREFIX + name) is not None:
            raise Conflict(
                f"function {name!r} already exists (PUT /system/functions/{name} updates it)"
            )
        await self._put(record)
        return record

    async def update(self, name: str, record: FunctionRecord) -> FunctionRecord:
        current = self.get(name)
        if record.spec.name != name:
            raise ValidationFailed(
                f"spec.name: {record.spec.name!r} does not match the URL ({name!r})"
            )
        updated = replace(
            current.bump(record.spec, record.checkpoint, record.checkpoint_bytes),
            handler_source=dict(record.handler_source),
            requirements=record.requirements,
        )
        await self._put(updated)
        return updated

    async def delete(self, name: str) -> FunctionRecord:
        record = self.get(name)
        await self._kv.delete(_PREFIX + name)
        self._records.pop(name, None)
        return record

    async def _put(self, record: FunctionRecord) -> None:
        await self._kv.put(_PREFIX + record.spec.name, json.dumps(record.to_dict()).encode())
        self._records[record.spec.name] = record
