"""The node's ``migrate`` command: run the protocol from one of its instances to a target
instance (on another node), publishing progress on ``sllm.migration.<id>.progress``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from runtime.migration.protocol import MigrationFailed, Peer, migrate_requests
from sllm.errors import Conflict, InvalidInput, NotFound
from sllm.messages import MigrateCmd, MigrationProgress, encode, migration_subject

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
# 60 s per call: an import round prefills every in-flight request's tokens on the target
# (~1-2k tokens/s on a CPU core for the tiny model, far more on a GPU).
CALL_TIMEOUT_S = 60.0


_http: httpx.AsyncClient | None = None


def _client() -> httpx.AsyncClient:
    """One client for the node's life: making one costs 0.1-2 s here (TLS setup, even for the
    plain-HTTP instance addresses), which would stall the first round while the streams run."""
    global _http
    if _http is None or _http.is_closed:
        _http = httpx.AsyncClient(
            timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=5.0), verify=False, trust_env=False
        )
    return _http


async def run_migrate_command(
    instances: Mapping[str, Any], cmd: MigrateCmd, publish: Publish
) -> dict[str, Any]:
    """Migrate ``cmd.instance_id``'s streamed requests; the reply data is the outcome.
    ``instances`` maps instance id -> an object with ``state``, ``address`` and ``secret``."""
    inst = instances.get(cmd.instance_id)
    if inst is None:
        raise NotFound(f"migrate: instance {cmd.instance_id} is not on this node")
    if inst.state not in ("ready", "draining") or not inst.address:
        raise Conflict(f"migrate: instance {cmd.instance_id} is {inst.state}, not serving")
    target = cmd.target_address.rstrip("/")
    if not target.startswith(("http://", "https://")):
        raise InvalidInput(f"migrate: target_address {cmd.target_address!r} is not an http URL")
    if target == inst.address:
        raise InvalidInput("migrate: the target is the source instance itself")

    async def progress(phase: str, round_: int, tokens: int, error: str = "") -> None:
        message = MigrationProgress(cmd.migration_id, phase, round_, tokens, error)
        with contextlib.suppress(Exception):  # progress is informative; NATS may be down
            await publish(migration_subject(cmd.migration_id, "progress"), encode(message))

    log.info(
        "migration %s start instance=%s target=%s (%s)",
        cmd.migration_id, cmd.instance_id, cmd.target_instance_id, target,
    )  # fmt: skip
    try:
        outcome = await migrate_requests(
            _client(),
            Peer(inst.address, getattr(inst, "secret", "")),
            Peer(target, cmd.target_secret),
            cmd.target_instance_id,
            max_rounds=cmd.max_rounds,
            threshold_tokens=cmd.threshold_tokens,
            progress=progress,
        )
    except MigrationFailed as exc:
        log.warning("migration %s failed: %s", cmd.migration_id, exc.message)
        await progress("failed", 0, 0, exc.message)
        raise
    log.info("migration %s done %s", cmd.migration_id, outcome.to_dict())
    return outcome.to_dict()
