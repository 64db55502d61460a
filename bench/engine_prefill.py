"""Chunked prefill benchmark: how long a decoding stream stalls while a long prompt is admitted.

    .venv/bin/python bench/engine_prefill.py --json bench/.data/engine_prefill.json

A tiny random Llama (``tests.tiny_model``, 4,096-token context) in one ``Engine`` per run.
One greedy stream decodes (``ignore_eos``, 200 tokens); at its 20th token its own sink submits a
2,000-token prompt (one output token), so the prompt is admitted at the next loop turn. Measured
on the decoding stream: the largest gap between two of its tokens (``stall_s``) and the median
gap (``step_s``, one decoding step); on the long prompt: the time from its submission to its
first token (``ttft_s``). Once with the engine's chunked prefill (``--chunk``, default 512) and
once unchunked (``prefill_chunk=0``), alternating, ``--runs`` times each; medians are reported.
``--device cuda`` runs the same on a GPU; ``--threads`` sets torch's CPU threads (default 1:
on a small shared machine, more threads than free cores make every step's time erratic).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path, and bench/gateway.py would shadow the
# gateway package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# The repository root, for tests/tiny_model.py (a test fixture, not a shipped module).
sys.path.append(str(Path(__file__).resolve().parent.parent))

from runtime.engine.engine import Engine  # noqa: E402
from runtime.engine.request import Event, FinishEvent, RequestState, TokenEvent  # noqa: E402
from runtime.engine.sampling import SamplingParams  # noqa: E402
from tests.tiny_model import TinyConfig, build_tiny_llama  # noqa: E402

LONG_PROMPT = 2000
STREAM_TOKENS = 200
SUBMIT_AT = 20


def one_run(model: Any, chunk: int, run: int) -> dict[str, float]:
    engine = Engine(model, lambda ids: "", max_batch=4, prefill_chunk=chunk)
    engine.start()
    rng = random.Random(run)
    times: list[float] = []
    marks: dict[str, float] = {}
    done = {"stream": threading.Event(), "long": threading.Event()}
    long = RequestState(
        f"long-{run}",
        [rng.randrange(10, 500) for _ in range(LONG_PROMPT)],
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    )

    def on_long(event: Event) -> None:
        if isinstance(event, TokenEvent):
            marks.setdefault("first", time.perf_counter())
        elif isinstance(event, FinishEvent):
            done["long"].set()

    def on_stream(event: Event) -> None:
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
            if len(times) == SUBMIT_AT:
                marks["submit"] = time.perf_counter()
                engine.submit(long, on_long)
        elif isinstance(event, FinishEvent):
            done["stream"].set()

    stream = RequestState(
        f"stream-{run}",
        [rng.randrange(10, 500) for _ in range(8)],
        SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True),
    )
    try:
        engine.submit(stream, on_stream)
        for name, flag in done.items():
            if not flag.wait(timeout=600):
                raise RuntimeError(f"{name} did not finish")
    finally:
        engine.stop()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "stall_s": max(gaps[SUBMIT_AT - 1 :]),
        "step_s": statistics.median(gaps),
        "ttft_s": marks["first"] - marks["submit"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_llama(Path(tmp) / "hf", config=TinyConfig(max_position_embeddings=4096))
        model: Any = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    one_run(model, args.chunk, -1)  # warm-up: first-use costs of torch and the model
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        for name, chunk in (("chunked", args.chunk), ("unchunked", 0)):
            row = {"mode": name, "prefill_chunk": chunk, "run": run, **one_run(model, chunk, run)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {
        name: {
            key: statistics.median(r[key] for r in rows if r["mode"] == name)
            for key in ("stall_s", "step_s", "ttft_s")
        }
        for name in ("chunked", "unchunked")
    }
    result = {
        "long_prompt_tokens": LONG_PROMPT,
        "prefill_chunk": args.chunk,
        "device": args.device,
        "threads": args.threads,
        "runs": args.runs,
        "median": summary,
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
