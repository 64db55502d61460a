"""A batching engine over the tiny model, shared by the engine tests of a module."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.backend.transformers import TransformersBackend
from runtime.engine.prompts import Tokenizing
from runtime.engine.request import ErrorEvent, Event, FinishEvent, RequestState, TokenEvent


@dataclass
class Outcome:
    ids: list[int]
    text: str
    finish: FinishEvent
    events: list[Event]


@dataclass
class EngineHarness:
    engine: TransformersBackend
    tok: Tokenizing

    def submit(self, state: RequestState) -> queue.Queue[Event]:
        events: queue.Queue[Event] = queue.Queue()
        self.engine.submit(state, events.put)
        return events

    @staticmethod
    def collect(events: queue.Queue[Event]) -> Outcome:
        seen: list[Event] = []
        while True:
            event = events.get(timeout=60)
            seen.append(event)
            if isinstance(event, ErrorEvent):
                raise AssertionError(f"engine error: {event}")
            if isinstance(event, FinishEvent):
                tokens = [e for e in seen if isinstance(e, TokenEvent)]
                ids = [t for e in tokens for t in e.token_ids]
                return Outcome(ids, "".join(e.delta for e in tokens), event, seen)

    def run(self, state: RequestState) -> Outcome:
        return self.collect(self.submit(state))


@pytest.fixture(scope="module")
def harness(tiny_model_dir: Path) -> Iterator[EngineHarness]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = Tokenizing(tokenizer)
    engine = TransformersBackend(model, tok.decode, eos_ids=[tokenizer.eos_token_id], max_batch=8)
    engine.start()
    yield EngineHarness(engine, tok)
    engine.stop()
