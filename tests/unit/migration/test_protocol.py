"""The round/switch protocol (runtime.migration.protocol) against scripted source and target
instances (httpx.MockTransport): when rounds stop, what is aborted on the target, and that any
failure before the switch leaves the requests on the source."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from runtime.migration.protocol import MigrationFailed, Peer, migrate_requests

SOURCE, TARGET = "http://source", "http://target"
# each side answers only its own secret (sllm.instance_auth)
SECRETS = {SOURCE: "sllmi_source", TARGET: "sllmi_target"}


def state(rid: str, outputs: int) -> dict[str, Any]:
    return {"request_id": rid, "prompt_ids": [1, 2, 3], "output_ids": [5] * outputs, "params": {}}


class Script:
    """The source answers ``rounds[k]`` to its k-th ``GET /v1/migration/requests`` (the last
    one again after that); every call is recorded as (method, url, body)."""

    def __init__(self, rounds: list[list[dict[str, Any]]]) -> None:
        self.rounds = rounds
        self.reads = 0
        self.calls: list[tuple[str, str, Any]] = []
        self.fail: Callable[[str, str], bool] = lambda method, url: False

    def handler(self, request: httpx.Request) -> httpx.Response:
        method, url = request.method, str(request.url)
        body = json.loads(request.content) if request.content else None
        self.calls.append((method, url, body))
        if self.fail(method, url):
            raise httpx.ConnectError("connection refused", request=request)
        side = SOURCE if url.startswith(SOURCE) else TARGET
        if request.headers.get("authorization") != f"Bearer {SECRETS[side]}":
            return httpx.Response(401, json={"error": {"code": "unauthorized", "message": url}})
        if url == f"{SOURCE}/v1/migration/requests":
            states = self.rounds[min(self.reads, len(self.rounds) - 1)]
            self.reads += 1
            return httpx.Response(200, json={"requests": states})
        if url == f"{TARGET}/v1/migration/import":
            staged = {s["request_id"]: len(s["output_ids"]) for s in body["states"]}
            return httpx.Response(200, json={"staged": staged})
        if url == f"{TARGET}/healthz":
            return httpx.Response(200, json={"ok": True})
        if url == f"{SOURCE}/v1/migration/handoff":
            last = {s["request_id"]: s for s in self.rounds[min(self.reads, len(self.rounds)) - 1]}
            moved = [last[r] for r in body["request_ids"] if r in last]
            return httpx.Response(200, json={"moved": moved, "finished": []})
        if url == f"{TARGET}/v1/migration/abort":
            return httpx.Response(200, json={"dropped": len(body["request_ids"])})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": url}})

    def bodies(self, url: str) -> list[Any]:
        return [body for method, u, body in self.calls if u == url]


async def run(script: Script, max_rounds: int = 3, threshold: int = 8) -> Any:
    phases: list[tuple[str, int, int]] = []

    async def progress(phase: str, round_: int, tokens: int) -> None:
        phases.append((phase, round_, tokens))

    async with httpx.AsyncClient(transport=httpx.MockTransport(script.handler)) as http:
        outcome = await migrate_requests(
            http, Peer(SOURCE, SECRETS[SOURCE]), Peer(TARGET, SECRETS[TARGET]), "t-1", max_rounds=max_rounds, threshold_tokens=threshold,
            progress=progress,
        )  # fmt: skip
    return outcome, phases


async def test_rounds_stop_under_threshold_then_switch() -> None:
    script = Script([[state("a", 100)], [state("a", 150)], [state("a", 154)]])
    outcome, phases = await run(script)
    assert (outcome.moved, outcome.finished, outcome.rounds) == (1, 0, 2)
    assert outcome.tokens == 3 + 154
    assert phases == [("round", 1, 103), ("round", 2, 50), ("switched", 2, 157)]
    (handoff,) = script.bodies(f"{SOURCE}/v1/migration/handoff")
    assert handoff["request_ids"] == ["a"] and handoff["target_instance_id"] == "t-1"
    assert script.bodies(f"{TARGET}/v1/migration/abort") == []


async def test_round_limit_ends_rounds() -> None:
    script = Script([[state("a", 10 * k)] for k in range(1, 10)])
    outcome, _ = await run(script, max_rounds=3)
    assert outcome.rounds == 3 and outcome.moved == 1
    assert len(script.bodies(f"{TARGET}/v1/migration/import")) == 3


async def test_request_finishing_between_rounds_is_aborted_on_target() -> None:
    # "b" was staged in round 1, then finished on the source: it is not handed off, its
    # staged cache is dropped on the target, and it counts as finished.
    script = Script([[state("a", 100), state("b", 100)], [state("a", 104)]])
    outcome, _ = await run(script)
    assert (outcome.moved, outcome.finished) == (1, 1)
    (handoff,) = script.bodies(f"{SOURCE}/v1/migration/handoff")
    assert handoff["request_ids"] == ["a"]
    assert script.bodies(f"{TARGET}/v1/migration/abort") == [{"request_ids": ["b"]}]


async def test_no_streams_moves_nothing() -> None:
    script = Script([[]])
    outcome, phases = await run(script)
    assert (outcome.moved, outcome.finished, outcome.rounds) == (0, 0, 0)
    assert phases == [] and script.bodies(f"{SOURCE}/v1/migration/handoff") == []


async def test_target_failing_aborts_before_the_switch() -> None:
    script = Script([[state("a", 100)], [state("a", 150)]])
    script.fail = lambda method, url: url == f"{TARGET}/v1/migration/import" and script.reads > 1
    with pytest.raises(MigrationFailed, match="target instance failed before the switch"):
        await run(script)
    assert script.bodies(f"{SOURCE}/v1/migration/handoff") == []
    assert script.bodies(f"{TARGET}/v1/migration/abort") == [{"request_ids": ["a"]}]


async def test_source_failing_mid_migration_aborts() -> None:
    script = Script([[state("a", 100)], [state("a", 150)]])
    script.fail = lambda method, url: url.startswith(SOURCE) and script.reads >= 1
    with pytest.raises(MigrationFailed, match="source instance failed during migration"):
        await run(script)
    assert script.bodies(f"{TARGET}/v1/migration/abort") == [{"request_ids": ["a"]}]


async def test_dead_target_at_the_switch_keeps_requests_on_source() -> None:
    script = Script([[state("a", 100)], [state("a", 102)]])
    script.fail = lambda method, url: url == f"{TARGET}/healthz"
    with pytest.raises(MigrationFailed, match="not ready for the switch"):
        await run(script)
    assert script.bodies(f"{SOURCE}/v1/migration/handoff") == []
