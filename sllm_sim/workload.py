"""A seeded synthetic trace: which function is called when, with how many tokens in and out."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from sllm_sim.config import Distribution, ModelConfig, WorkloadConfig


@dataclass(frozen=True)
class SimFunction:
    """A deployed function: its own checkpoint (key, bytes) of ``model``."""

    name: str
    checkpoint: str
    model: ModelConfig


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; parallel lists so a trace of 360,000 calls stays small."""

    functions: tuple[SimFunction, ...]
    arrivals: list[float]
    function: list[int]
    tokens_in: list[int]
    tokens_out: list[int]

    def __len__(self) -> int:
        return len(self.arrivals)


def build_trace(workload: WorkloadConfig, models: tuple[ModelConfig, ...], seed: int) -> Trace:
    """The same (workload, models, seed) always gives the same trace."""
    rng = random.Random(seed)
    functions = tuple(
        SimFunction(f"fn-{i:05d}", f"checkpoints/fn-{i:05d}/{i:016x}", models[i % len(models)])
        for i in range(workload.functions)
    )
    # Zipf popularity over a seeded shuffle, so the popular functions are spread over models.
    ranks = list(range(1, workload.functions + 1))
    rng.shuffle(ranks)
    cum = list(itertools.accumulate(1.0 / r**workload.zipf_s for r in ranks))
    arrivals = _arrivals(workload, rng)
    n = len(arrivals)
    chosen = rng.choices(range(workload.functions), cum_weights=cum, k=n)
    return Trace(
        functions=functions,
        arrivals=arrivals,
        function=chosen,
        tokens_in=_lengths(workload.input_tokens, rng, n),
        tokens_out=_lengths(workload.output_tokens, rng, n),
    )


def _arrivals(workload: WorkloadConfig, rng: random.Random) -> list[float]:
    rate, end = workload.rps, workload.duration_s
    out: list[float] = []
    t = 0.0
    if workload.arrivals == "poisson":
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                return out
            out.append(t)
    # Gamma inter-arrivals with mean 1/rate and coefficient of variation cv: shape 1/cv^2.
    shape = 1.0 / (workload.cv * workload.cv)
    scale = 1.0 / (rate * shape)
    while True:
        t += rng.gammavariate(shape, scale)
        if t >= end:
            return out
        out.append(t)


def _lengths(dist: Distribution, rng: random.Random, n: int) -> list[int]:
    if dist.kind == "fixed":
        return [max(1, round(dist.value))] * n
    if dist.kind == "uniform":
        lo, hi = round(dist.low), round(dist.high)
        return [rng.randint(lo, hi) for _ in range(n)]
    # Lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2.
    mu = math.log(dist.mean) - dist.sigma * dist.sigma / 2
    return [max(1, round(rng.lognormvariate(mu, dist.sigma))) for _ in range(n)]
