"""Requests as a fault-injection run sees them: clients that keep invoking a function while
parts of the platform are killed, and every answer classified against the same greedy request
made with no fault. Used by ``tests/integration/faults`` and ``bench/chaos.py``.

Kinds of outcome:
- ``ok``: 200 and byte-identical text (streamed: every delta, then ``[DONE]``);
- ``error``: a clear error: a 4xx/502/503/504 with the JSON error body, or a stream that ends
  with an ``error`` event;
- ``refused``: the connection was refused (nothing listened: the request was never accepted);
  with several gateways, only when every one refused it (a client tries the next at once, as a
  Kubernetes Service or any load balancer in front of several gateways does);
- ``cut``: accepted, then the connection ended without an answer, ``[DONE]`` or an error event
  (only the death of the gateway that accepted it can do that);
- ``wrong``: anything else: other text, a 500, an error without the JSON body, no answer in
  time (hung). A run passes when there is none.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = ("hello", "The capital of France is", "Tell me a story", "0 1 2 3")
KINDS = ("ok", "error", "refused", "cut", "wrong")


@dataclass(frozen=True)
class Outcome:
    """One request's end: its kind (see the module doc), HTTP status, what it was, when it
    was sent (monotonic), how long it took and whether it was streamed."""

    kind: str
    status: int
    detail: str
    started: float
    seconds: float
    stream: bool


Done = Callable[[str, int, str], Outcome]


@dataclass
class Tally:
    """Outcomes of a run, and what it counts."""

    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        found = Counter(o.kind for o in self.outcomes)
        return {kind: found.get(kind, 0) for kind in KINDS}

    def errors(self) -> dict[str, int]:
        """Clear errors by status and code (``503 unavailable``, ``stream instance_failed``)."""
        return dict(Counter(o.detail for o in self.outcomes if o.kind == "error"))

    def wrong(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "wrong"]

    def between(self, start: float, end: float = float("inf")) -> Tally:
        """The outcomes of the requests sent in [start, end)."""
        return Tally([o for o in self.outcomes if start <= o.started < end])

    async def until(self, kind: str, n: int, since: float = 0.0, timeout_s: float = 180.0) -> None:
        """Wait until ``n`` requests sent since ``since`` ended as ``kind``."""
        deadline = time.monotonic() + timeout_s
        while self.between(since).counts()[kind] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{n} {kind} outcomes not reached: {self.between(since).counts()}"
                )
            await asyncio.sleep(0.05)


def body(prompt: str, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


async def references(client: httpx.AsyncClient, url: str, function: str) -> dict[str, str]:
    """The fault-free greedy answer to every prompt (asked once, not streamed)."""
    out = {}
    for prompt in PROMPTS:
        r = await client.post(f"{url}/function/{function}", json=body(prompt, False), timeout=300)
        r.raise_for_status()
        out[prompt] = r.json()["text"]
    return out


async def invoke(
    client: httpx.AsyncClient,
    url: str,
    function: str,
    prompt: str,
    expected: str,
    *,
    stream: bool,
    timeout_s: float,
) -> Outcome:
    started = time.monotonic()

    def done(kind: str, status: int, detail: str) -> Outcome:
        return Outcome(kind, status, detail, started, time.monotonic() - started, stream)

    try:
        async with asyncio.timeout(timeout_s):
            return await _exchange(client, url, function, prompt, expected, stream, done)
    except TimeoutError:
        return done("wrong", 0, f"no answer within {timeout_s:g}s")
    except httpx.ConnectError:
        return done("refused", 0, "connection refused")
    except httpx.TransportError as exc:
        return done("cut", 0, type(exc).__name__)


async def _exchange(
    client: httpx.AsyncClient,
    url: str,
    function: str,
    prompt: str,
    expected: str,
    stream: bool,
    done: Done,
) -> Outcome:
    request = client.build_request("POST", f"{url}/function/{function}", json=body(prompt, stream))
    response = await client.send(request, stream=True)
    try:
        status = response.status_code
        kind = response.headers.get("content-type", "")
        if status != 200 or not kind.startswith("text/event-stream"):
            raw = await response.aread()
            return _whole(status, raw, expected, done)
        text, last = "", None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last == "[DONE]":
                break
            event = json.loads(last)
            if "error" in event:
                return done("error", status, f"stream {event['error'].get('code')}")
            text += event.get("delta") or ""
        if last != "[DONE]":
            return done("cut", status, "stream ended without [DONE] or an error event")
        return done("ok", status, "") if text == expected else done("wrong", status, text[:80])
    finally:
        await response.aclose()


def _whole(status: int, raw: bytes, expected: str, done: Done) -> Outcome:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return done("wrong", status, f"not JSON: {raw[:80]!r}")
    if status == 200:
        text = data.get("text") if isinstance(data, dict) else None
        return done("ok", status, "") if text == expected else done("wrong", status, str(text))
    error = data.get("error") if isinstance(data, dict) else None
    if status == 500 or not isinstance(error, dict) or not error.get("message"):
        return done("wrong", status, f"{status} {raw[:120]!r}")
    return done("error", status, f"{status} {error.get('code')}")


async def clients(
    url: str | list[str],
    function: str,
    expected: dict[str, str],
    stop: asyncio.Event,
    *,
    count: int = 4,
    timeout_s: float = 120.0,
    pause_s: float = 0.05,
    tally: Tally | None = None,
) -> Tally:
    """``count`` clients in closed loops until ``stop`` is set, alternating streamed and
    whole answers over ``PROMPTS``; every outcome goes into ``tally`` as it ends (so a run can
    inject its fault at a known point: after so many answers). With several ``url``s (one per
    gateway) the requests take turns, and a refused one is sent to the next gateway at once."""
    tally = tally if tally is not None else Tally()
    urls = [url] if isinstance(url, str) else list(url)

    async def one(i: int) -> None:
        n = i
        async with httpx.AsyncClient(timeout=None) as client:
            while not stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                for attempt in range(len(urls)):
                    target = urls[(n + attempt) % len(urls)]
                    outcome = await invoke(client, target, function, prompt, expected[prompt],
                                           stream=n % 2 == 0, timeout_s=timeout_s)  # fmt: skip
                    if outcome.kind != "refused":
                        break
                tally.outcomes.append(outcome)
                n += 1
                if outcome.kind == "refused":
                    await asyncio.sleep(0.25)  # nothing listens: do not spin
                else:
                    await asyncio.sleep(pause_s)

    await asyncio.gather(*(one(i) for i in range(count)))
    return tally


@asynccontextmanager
async def clients_on(
    url: str, function: str, *, to: str | list[str] | None = None, count: int = 4
) -> AsyncIterator[Tally]:
    """``clients`` on ``function`` for as long as the block runs, its reference answers taken
    at ``url`` first; they send to ``to`` (``url`` by default, or one URL per gateway). Yields
    their tally; on the way out the clients are stopped and awaited."""
    async with httpx.AsyncClient() as client:
        expected = await references(client, url, function)
    tally, stop = Tally(), asyncio.Event()
    run = asyncio.create_task(
        clients(to or url, function, expected, stop, count=count, tally=tally)
    )
    try:
        yield tally
    finally:
        stop.set()
        await run
