"""The learned resume-cost fits (``estimators.MigrationModels``, ``a * tokens + b`` per
checkpoint) kept in the gateway's KeyValue bucket (JetStream KV), so a restarted gateway
places with what earlier migrations taught it rather than the prior.

One key per checkpoint, ``migfit.<sha256 of the checkpoint key, 32 hex>`` (a checkpoint key
may hold characters a KV key may not), holding JSON ``{"version": 1, "checkpoint": <key>,
"n", "sx", "sy", "sxx", "sxy"}``: the sufficient statistics, so observations after a restart
extend the same least-squares fit. Written after each observed migration, read at start.
Best effort both ways: a KV failure or an unreadable record is logged and the gateway goes on
with what it has in memory (placements then use the prior for that checkpoint). Several
gateways on one bucket: the last write of a checkpoint wins (each writes its own counts).
"""

from __future__ import annotations

import hashlib
import json
import logging

from gateway.scheduler.estimators import MigrationModels
from sllm.bus import KeyValue
from sllm.errors import InvalidInput

log = logging.getLogger(__name__)

PREFIX = "migfit."
VERSION = 1


def fit_key(checkpoint: str) -> str:
    return PREFIX + hashlib.sha256(checkpoint.encode()).hexdigest()[:32]


class MigrationFitStore:
    def __init__(self, kv: KeyValue, models: MigrationModels) -> None:
        self._kv = kv
        self.models = models

    async def load(self) -> int:
        """Restore every saved fit into ``models``; returns how many were restored."""
        try:
            keys = [k for k in await self._kv.keys() if k.startswith(PREFIX)]
        except Exception as exc:  # any KV/transport error: start from the prior
            log.warning("migration fits: cannot list the bucket, using the prior: %s", exc)
            return 0
        restored = 0
        for key in keys:
            try:
                raw = await self._kv.get(key)
                if raw is None:
                    continue
                checkpoint = _restore(self.models, key, raw)
            except Exception as exc:  # a KV error or a bad record costs that checkpoint only
                log.warning("migration fits: skipping key=%s error=%s", key, exc)
                continue
            restored += 1
            log.info(
                "migration fit restored checkpoint=%s %s", checkpoint, self.models.state(checkpoint)
            )
        return restored

    async def save(self, checkpoint: str) -> None:
        """Write ``checkpoint``'s current statistics (after an observed migration)."""
        state = self.models.state(checkpoint)
        if state is None:
            return
        record = {"version": VERSION, "checkpoint": checkpoint, **state}
        try:
            await self._kv.put(fit_key(checkpoint), json.dumps(record).encode())
        except Exception as exc:  # keep the in-memory fit; the next migration writes again
            log.warning("migration fit not saved checkpoint=%s error=%s", checkpoint, exc)


def _restore(models: MigrationModels, key: str, raw: bytes) -> str:
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"not JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise InvalidInput(f"expected a version {VERSION} fit record")
    checkpoint = record.get("checkpoint")
    if not isinstance(checkpoint, str) or fit_key(checkpoint) != key:
        raise InvalidInput(f"checkpoint {checkpoint!r} does not match the key")
    models.restore(checkpoint, record)
    return checkpoint
