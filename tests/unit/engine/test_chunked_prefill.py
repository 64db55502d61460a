"""Chunked prefill on a real (tiny) model: the same tokens as a whole prefill, running streams
decode between a long prompt's chunks, one token budget per turn across prompts, cancel and
snapshots while a prompt is still prefilling, live migration's staged caches.

Interleaving is made deterministic by submitting (or cancelling) from a running request's sink:
the sink runs on the engine thread, so the request is pending before the next loop turn."""

from __future__ import annotations

import itertools
import math
import queue
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from runtime.engine.request import Event, FinishEvent, RequestState, TokenEvent
from runtime.engine.sampling import SamplingParams
from runtime.migration.handoff import MigrationHub

from .conftest import EngineHarness

CHUNK = 7
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=77, ignore_eos=True)
_ids = itertools.count()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]  # ids past the special tokens


def _state(prompt: list[int], params: SamplingParams) -> RequestState:
    return RequestState(f"c{next(_ids)}", list(prompt), params)


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> Iterator[tuple[EngineHarness, EngineHarness]]:
    """(chunked: ``prefill_chunk=7``, whole: ``prefill_chunk=0``) over one model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    made = [
        TransformersBackend(
            model, tok.decode, eos_ids=[tokenizer.eos_token_id], max_batch=8, prefill_chunk=c
        )
        for c in (CHUNK, 0)
    ]
    for e in made:
        e.start()
    yield EngineHarness(made[0], tok), EngineHarness(made[1], tok)
    for e in made:
        e.stop()


@pytest.fixture
def chunked(engines: tuple[EngineHarness, EngineHarness]) -> EngineHarness:
    return engines[0]


@pytest.fixture
def whole(engines: tuple[EngineHarness, EngineHarness]) -> EngineHarness:
    return engines[1]


class Log:
    """Every event of several requests in the order the engine thread delivered them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []
        self.done: dict[str, threading.Event] = {}

    def sink(
        self, rid: str, then: Callable[[Event], None] | None = None
    ) -> Callable[[Event], None]:
        self.done[rid] = threading.Event()

        def deliver(event: Event) -> None:
            self.events.append((rid, event))
            if then is not None:
                then(event)
            if isinstance(event, FinishEvent):
                self.done[rid].set()

        return deliver

    def wait(self) -> None:
        """Until every request finished, also those submitted meanwhile by a sink."""
        waited: set[str] = set()
        while pending := [rid for rid in list(self.done) if rid not in waited]:
            for rid in pending:
                assert self.done[rid].wait(timeout=60), f"{rid} did not finish"
                waited.add(rid)

    def tokens(self, rid: str) -> list[int]:
        return [t for r, e in self.events if r == rid and isinstance(e, TokenEvent)
                for t in e.token_ids]  # fmt: skip

    def finish(self, rid: str) -> FinishEvent:
        return next(e for r, e in self.events if r == rid and isinstance(e, FinishEvent))

    def tokens_between(self, rid: str, after: int, before_first_of: str) -> int:
        """Tokens of ``rid`` from event index ``after`` until the first token of another."""
        count = 0
        for r, e in self.events[after:]:
            if r == before_first_of and isinstance(e, TokenEvent):
                return count
            count += r == rid and isinstance(e, TokenEvent)
        raise AssertionError(f"{before_first_of} produced no token")


def _on_token(k: int, action: Callable[[], None]) -> Callable[[Event], None]:
    """A sink hook that runs ``action`` (on the engine thread) at the ``k``-th token."""
    seen = itertools.count(1)

    def hook(event: Event) -> None:
        if isinstance(event, TokenEvent) and next(seen) == k:
            action()

    return hook


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("length", [30, 64, 100])
def test_one_chunked_request_equals_whole_prefill(
    chunked: EngineHarness, whole: EngineHarness, params: SamplingParams, length: int
) -> None:
    prompt = _prompt(length, seed=length)
    expected = whole.run(_state(prompt, params)).ids
    assert len(expected) == 20
    assert chunked.run(_state(prompt, params)).ids == expected


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_requests_arriving_while_others_decode_equal_whole_prefill(
    chunked: EngineHarness, whole: EngineHarness, params: SamplingParams
) -> None:
    prompts = [_prompt(n, seed=n) for n in (45, 3, 100, 31, 77)]
    expected = [whole.run(_state(p, params)).ids for p in prompts]
    first = chunked.submit(_state(prompts[0], params))
    head = first.get(timeout=60)  # the first one is decoding (it was itself chunked)
    assert isinstance(head, TokenEvent)
    rest = [chunked.submit(_state(p, params)) for p in prompts[1:]]
    got = [head.token_ids + chunked.collect(first).ids] + [chunked.collect(q).ids for q in rest]
    assert got == expected


def _long_prompts_during_decoding(
    h: EngineHarness, prompts: list[list[int]]
) -> tuple[int, list[list[int]]]:
    """Submit ``prompts`` at a decoding stream's 3rd token: (the stream's tokens from then until
    the last prompt's first token, the prompts' outputs)."""
    log = Log()
    decoding = _state(_prompt(5, seed=1), SamplingParams(max_tokens=60, temperature=0.0,
                                                         ignore_eos=True))  # fmt: skip
    longs = [_state(p, GREEDY) for p in prompts]
    submitted: list[int] = []

    def submit_longs() -> None:
        submitted.append(len(log.events))
        for s in longs:
            h.engine.submit(s, log.sink(s.request_id))

    h.engine.submit(decoding, log.sink(decoding.request_id, _on_token(3, submit_longs)))
    log.wait()
    assert len(log.tokens(decoding.request_id)) == 60
    between = log.tokens_between(decoding.request_id, submitted[0], longs[-1].request_id)
    return between, [log.tokens(s.request_id) for s in longs]


@pytest.mark.parametrize("lengths", [[100], [50, 50]], ids=["one", "two-share-the-budget"])
def test_a_decoding_stream_gets_tokens_between_a_long_prompts_chunks(
    chunked: EngineHarness, whole: EngineHarness, lengths: list[int]
) -> None:
    prompts = [_prompt(n, seed=1000 + i) for i, n in enumerate(lengths)]
    between_chunks, chunked_out = _long_prompts_during_decoding(chunked, prompts)
    between_whole, whole_out = _long_prompts_during_decoding(whole, prompts)
    # one turn per CHUNK tokens of all long prompts together, with a decoding step after every
    # turn but the last (whose logits give the last prompt its first token before that step)
    assert between_chunks == math.ceil(sum(lengths) / CHUNK) - 1
    assert between_whole == 0
    assert chunked_out == whole_out


def test_cancel_during_prefill_finishes_it_and_frees_its_slot(
    chunked: EngineHarness, whole: EngineHarness
) -> None:
    engine = chunked.engine
    prompt = _prompt(100, seed=5)  # 15 chunks: still prefilling two turns after admission
    log = Log()
    decoding = _state(_prompt(4, seed=2), SamplingParams(max_tokens=40, temperature=0.0,
                                                         ignore_eos=True))  # fmt: skip
    long = _state(prompt, GREEDY)
    seen: dict[str, Any] = {}

    def snapshot() -> None:
        seen["snapshot"] = engine.snapshot(long.request_id)
        seen["load"] = engine.load()

    def at_finish(event: Event) -> None:
        if isinstance(event, FinishEvent):  # the engine has let it go before telling its sink
            seen["in_flight_after"] = engine.load().in_flight

    # at the decoding stream's 3rd token the long prompt is submitted; it is admitted and
    # gets a chunk in each of the next turns: at the 5th its state is read, at the 6th it is
    # cancelled (after 3 of its 15 chunks)
    actions: dict[int, Callable[[], None]] = {
        3: lambda: engine.submit(long, log.sink(long.request_id, at_finish)),
        5: snapshot,
        6: lambda: engine.cancel(long.request_id),
    }
    tokens = itertools.count(1)

    def on_decoding(event: Event) -> None:
        if isinstance(event, TokenEvent) and (action := actions.get(next(tokens))):
            action()

    engine.submit(decoding, log.sink(decoding.request_id, on_decoding))
    log.wait()
    assert log.finish(long.request_id).finish_reason == "cancelled"
    assert log.finish(long.request_id).completion_tokens == 0
    assert log.tokens(long.request_id) == []
    # while prefilling it is active (it counts in load) and exports its prompt as its state
    assert seen["snapshot"] == long.export() and seen["snapshot"]["output_ids"] == []
    assert seen["load"].in_flight == 2
    assert seen["load"].tokens_in == len(prompt) + len(decoding.prompt_ids)
    assert seen["in_flight_after"] == 1  # only the decoding request is left
    assert len(log.tokens(decoding.request_id)) == 40
    assert engine.load().in_flight == 0
    # the engine goes on: the same prompt again runs to the end, as with a whole prefill
    assert chunked.run(_state(prompt, GREEDY)).ids == whole.run(_state(prompt, GREEDY)).ids


def test_a_prefilling_request_counts_against_the_batch_limit(chunked: EngineHarness) -> None:
    engine = TransformersBackend(
        chunked.engine.model, lambda ids: "", max_batch=1, prefill_chunk=CHUNK
    )
    engine.start()
    try:
        log = Log()
        long, short = _state(_prompt(60, seed=9), GREEDY), _state(_prompt(3, seed=9), GREEDY)
        engine.submit(long, log.sink(long.request_id))
        engine.submit(short, log.sink(short.request_id))
        log.wait()
        order = [r for r, e in log.events if isinstance(e, TokenEvent)]
        # the short one waited for the long one's slot, although the long one was prefilling
        assert order == [long.request_id] * 20 + [short.request_id] * 20
    finally:
        engine.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_staged_cache_with_chunking_resumes_identically(
    chunked: EngineHarness, whole: EngineHarness, temperature: float
) -> None:
    params = SamplingParams(max_tokens=60, temperature=temperature, top_p=0.9, seed=1234,
                            ignore_eos=True)  # fmt: skip
    prompt = _prompt(40, seed=40)
    reference = whole.run(_state(prompt, params)).ids
    assert len(reference) == 60
    engine = chunked.engine
    hub = MigrationHub(engine)
    rid = f"moved-{temperature}"

    def export(k: int) -> dict[str, Any]:
        return RequestState(rid, prompt, params, reference[:k]).export()

    assert hub.stager.stage([export(10)]) == {rid: len(prompt) + 9}
    # the source went on 25 tokens past the round: 26 left to compute, more than one chunk
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(RequestState.from_export(export(35)), events.put)
    assert chunked.collect(events).ids == reference[35:]
    assert rid not in engine.staged  # the engine took it
