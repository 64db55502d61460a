"""The function registry: ``FunctionRecord``s in a KeyValue bucket (JetStream KV in production).

The bucket is the truth; the in-memory copy that serves the request path *follows* it by
watching it, so a gateway never serves from a copy that drifted: a write this gateway makes,
one another gateway makes, and one that lands late are all seen the same way (issue 14). A
write goes to the bucket first and is applied here only once the bucket took it (so the
answer to the write reads it back at once); while the bucket is unreachable a write fails
with 503 and is not made later (``sllm.nats_bus``), and the copy keeps serving what it has.

Nothing here is held by one gateway alone: several gateways can share the bucket, each
following it (records carry their own revision, and updates are conditional on the entry's
last revision, so two concurrent updates cannot both win).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from sllm.bus import KeyValue, KvEntry
from sllm.errors import Conflict, NotFound, Unavailable, ValidationFailed
from sllm.spec import FunctionRecord
from sllm.tasks import cancel_all

log = logging.getLogger(__name__)

BUCKET = "sllm-functions"
_PREFIX = "fn."
# Seconds between attempts to watch the bucket again after the watch failed (NATS down:
# JetStream answers again a little after the server is back).
RETRY_S = 1.0
# Seconds a watch may go without delivering the next entry of the bucket's snapshot (or its end
# marker). A watch started while NATS reconnects can stay silent for good; seen in a fault run:
# the copy then missed every later change, a deleted function's instance was never drained. A
# snapshot that still arrives (a large bucket) is never cut: only silence counts.
SNAPSHOT_S = 3.0

Listener = Callable[[str, FunctionRecord | None], None]
"""Told of every change the copy takes: (name, record, or None when it was deleted)."""


class Registry:
    def __init__(
        self, kv: KeyValue, retry_s: float = RETRY_S, snapshot_s: float = SNAPSHOT_S
    ) -> None:
        self._kv = kv
        self._retry_s = retry_s
        self._snapshot_s = snapshot_s
        self._records: dict[str, FunctionRecord] = {}
        self._revisions: dict[str, int] = {}  # key -> revision of the entry the copy holds
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0  # watches started after the first (reconnects), for tests and logs

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # --- following the bucket ----------------------------------------------------------------
    async def load(self) -> None:
        """Take the bucket's current contents, then follow its changes in a task."""
        watch = self._kv.watch()
        await self._sync(watch)
        self._task = asyncio.create_task(self._follow(watch), name="registry-watch")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_all([self._task])
            self._task = None

    async def _sync(self, watch: AsyncIterator[KvEntry | None]) -> None:
        """Apply a watch's snapshot; keys the snapshot lacks were deleted meanwhile. A snapshot
        silent for ``snapshot_s`` before its end marker, or a watch that ends before it, is an
        error: nothing is taken for deleted, and the caller watches again."""
        seen: set[str] = set()
        complete = False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._snapshot_s) as silence:
                async for entry in watch:
                    if entry is None:
                        complete = True
                        break
                    seen.add(entry.key)
                    self._apply(entry)
                    silence.reschedule(loop.time() + self._snapshot_s)
        except TimeoutError:  # the cancelled generator closed its watch on the way out
            raise Unavailable(
                f"the bucket's snapshot stalled: nothing for {self._snapshot_s:g}s"
            ) from None
        if not complete:
            raise Unavailable("the watch ended before the bucket's snapshot was complete")
        # A key the snapshot lacks is asked for directly before it is taken for deleted: a watch
        # made while a restarted server loads its streams can end its snapshot at once, empty
        # (seen in a full run: the copy lost a function nobody had deleted).
        for key in [k for k in self._revisions if k not in seen]:
            found = await self._kv.entry(key)
            if found is None:
                self._apply(KvEntry(key, None, self._revisions[key] + 1), force=True)
            else:
                self._apply(KvEntry(key, found.value, found.revision))

    async def _follow(self, watch: AsyncIterator[KvEntry | None]) -> None:
        while True:
            try:
                async for entry in watch:
                    if entry is not None:
                        self._apply(entry)
                log.info(
                    "registry: the watch ended (NATS reconnected or its consumer was lost); reading the bucket again"
                )
            except Exception as exc:
                log.warning("registry: watching the bucket failed: %s", exc)
                await asyncio.sleep(self._retry_s)
            while True:
                try:
                    watch = self._kv.watch()
                    await self._sync(watch)
                    self.resyncs += 1
                    log.info(
                        "registry: following the bucket again (%d functions)", len(self._records)
                    )
                    break
                except Exception as exc:
                    log.warning("registry: cannot read the bucket yet: %s", exc)
                    await asyncio.sleep(self._retry_s)

    def _apply(self, entry: KvEntry, *, force: bool = False) -> None:
        """Take one bucket entry into the copy unless the copy already holds a newer one."""
        if not entry.key.startswith(_PREFIX):
            return
        if not force and entry.revision <= self._revisions.get(entry.key, 0):
            return
        self._revisions[entry.key] = entry.revision
        name = entry.key[len(_PREFIX) :]
        record: FunctionRecord | None = None
        if entry.value is not None:
            try:
                record = FunctionRecord.from_dict(json.loads(entry.value))
            except (ValueError, ValidationFailed) as exc:
                log.warning("registry: skipping unreadable record key=%s error=%s", entry.key, exc)
        if record is None:
            if self._records.pop(name, None) is None:
                return
        else:
            self._records[name] = record
        for listener in self._listeners:
            listener(name, record)

    # --- reads (the request path: memory only) -------------------------------------------------
    def get(self, name: str) -> FunctionRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFound(f"function {name!r} is not deployed")
        return record

    def find(self, name: str) -> FunctionRecord | None:
        return self._records.get(name)

    def all(self) -> list[FunctionRecord]:
        return [self._records[name] for name in sorted(self._records)]

    # --- writes (the bucket first) ----------------------------------------------------------
    async def create(self, record: FunctionRecord) -> FunctionRecord:
        name = record.spec.name
        if name in self._records:
            raise Conflict(self._exists(name))
        value = _encode(record)
        try:
            revision = await self._kv.create(_PREFIX + name, value)
        except Conflict:
            raise Conflict(self._exists(name)) from None
        self._apply(KvEntry(_PREFIX + name, value, revision))
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
        value = _encode(updated)
        key = _PREFIX + name
        try:
            revision = await self._kv.update(key, value, self._revisions.get(key, 0))
        except Conflict:
            raise Conflict(f"function {name!r} was changed meanwhile; retry the update") from None
        self._apply(KvEntry(key, value, revision))
        return updated

    async def delete(self, name: str) -> FunctionRecord:
        record = self.get(name)
        key = _PREFIX + name
        await self._kv.delete(key)
        # the bucket's tombstone (a later revision) reaches the watch too, a no-op then
        self._apply(KvEntry(key, None, self._revisions.get(key, 0)), force=True)
        return record

    @staticmethod
    def _exists(name: str) -> str:
        return f"function {name!r} already exists (PUT /system/functions/{name} updates it)"


def _encode(record: FunctionRecord) -> bytes:
    return json.dumps(record.to_dict()).encode()
