"""Instance side of live migration on one in-process engine: staged prefill rounds, the switch
of a live stream, and the resumed output equal to an unmigrated run token for token."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import pytest

from runtime.engine.engine import Engine
from runtime.engine.request import Event, FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from runtime.migration.handoff import Handoff, MigrationHub, Target
from sllm.errors import InvalidInput

PROMPT = [1, 17, 42, 99, 7, 23, 5]


def _params(temperature: float) -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=temperature, top_p=0.9, seed=1234,
                          ignore_eos=True)  # fmt: skip


def _run(engine: Engine, state: RequestState) -> list[int]:
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(state, events.put)
    ids: list[int] = []
    while True:
        event = events.get(timeout=60)
        if isinstance(event, TokenEvent):
            ids.extend(event.token_ids)
        elif isinstance(event, FinishEvent):
            return ids
        else:
            raise AssertionError(event)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_staged_rounds_resume_identically(engine: Engine, temperature: float) -> None:
    reference = _run(engine, RequestState(f"ref-{temperature}", PROMPT, _params(temperature)))
    assert len(reference) == 40
    hub = MigrationHub(engine)
    rid = f"moved-{temperature}"

    def export(k: int) -> dict[str, Any]:
        return RequestState(rid, PROMPT, _params(temperature), reference[:k]).export()

    # round 1 at 10 tokens, round 2 at 18: only the new tokens are prefilled, newest left out
    assert hub.stager.stage([export(10)]) == {rid: len(PROMPT) + 9}
    assert hub.stager.stage([export(18)]) == {rid: len(PROMPT) + 17}
    _cache, covered = engine.staged[rid]
    assert covered == PROMPT + reference[:17]
    final = RequestState.from_export(export(21))  # the source went on 3 tokens past round 2
    assert _run(engine, final) == reference[21:]
    assert rid not in engine.staged  # the engine took the staged cache


def test_stage_rejects_bad_state(engine: Engine) -> None:
    hub = MigrationHub(engine)
    with pytest.raises(InvalidInput, match="prompt_ids"):
        hub.stager.stage([{"request_id": "x", "prompt_ids": "no", "output_ids": [], "params": {}}])


def test_aborted_stage_is_dropped(engine: Engine) -> None:
    hub = MigrationHub(engine)
    state = RequestState("dropped", PROMPT, _params(0.0), [3, 4])
    hub.stager.stage([state.export()])
    assert "dropped" in engine.staged
    assert hub.stager.drop(["dropped", "unknown"]) == 1
    assert "dropped" not in engine.staged and hub.stager.staged() == {}


async def test_switch_ends_stream_with_final_state(engine: Engine) -> None:
    params = _params(0.8)
    reference = _run(engine, RequestState("ref-switch", PROMPT, params))
    hub = MigrationHub(engine)
    state = RequestState("switched", PROMPT, params)
    sent: list[int] = []
    handoffs: list[Handoff] = []
    five = asyncio.Event()

    async def consume() -> None:
        async for event in hub.events(state):
            if isinstance(event, TokenEvent):
                sent.extend(event.token_ids)
                if len(sent) >= 5:
                    five.set()
            elif isinstance(event, Handoff):
                handoffs.append(event)
            else:
                raise AssertionError(f"stream ended with {event}")

    task = asyncio.create_task(consume())
    await asyncio.wait_for(five.wait(), 30)
    assert [s["request_id"] for s in hub.migratable()] == ["switched"]
    moved, finished = await hub.handoff(["switched", "gone"], Target("t-1", "http://t"), 10.0)
    await asyncio.wait_for(task, 10)
    assert finished == ["gone"] and len(moved) == 1 and len(handoffs) == 1
    final = handoffs[0].state
    assert final == moved[0] and final["output_ids"] == sent  # every sent token, nothing more
    payload = handoffs[0].payload()["migrated"]
    assert payload["target_address"] == "http://t" and payload["request_id"] == "switched"
    assert "switched" not in hub.streams
    resumed = _run(engine, RequestState.from_export(final))
    assert sent + resumed == reference


async def test_request_finishing_before_switch_is_not_moved(engine: Engine) -> None:
    hub = MigrationHub(engine)
    state = RequestState("short", PROMPT, SamplingParams(max_tokens=2, temperature=0.0, seed=1))
    events = [e async for e in hub.events(state)]
    assert isinstance(events[-1], FinishEvent)
    moved, finished = await hub.handoff(["short"], Target("t", "http://t"), 1.0)
    assert moved == [] and finished == ["short"]
