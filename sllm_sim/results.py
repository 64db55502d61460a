"""What one simulation run measured, and its summary figures.

Latency is time to first token (arrival -> first token: waiting for an instance, loading,
prefill), the figure a cold start hurts; ``e2e`` adds the decode of the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sllm_sim.workload import Trace


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class SimResult:
    policy: str
    rps: float
    requests: int
    latencies: list[float] = field(default_factory=list)  # sorted TTFT seconds
    e2e: list[float] = field(default_factory=list)  # sorted
    loads: dict[str, int] = field(default_factory=lambda: {"dram": 0, "ssd": 0, "store": 0})
    migrations: int = 0
    evictions: int = 0
    no_capacity: int = 0
    decision_seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    migration_fits: dict[str, tuple[float, float]] = field(default_factory=dict)

    def count_load(self, tier: str) -> None:
        self.loads[tier] = self.loads.get(tier, 0) + 1

    def finish(self, trace: Trace, first: list[float], done: list[float], wall_s: float) -> None:
        arrivals = trace.arrivals
        self.latencies = sorted(first[i] - arrivals[i] for i in range(len(arrivals)))
        self.e2e = sorted(done[i] - arrivals[i] for i in range(len(arrivals)))
        self.wall_s = wall_s

    @property
    def mean_s(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.nan

    def summary(self) -> dict[str, Any]:
        lat, dec = self.latencies, sorted(self.decision_seconds)
        return {
            "policy": self.policy,
            "rps": self.rps,
            "requests": self.requests,
            "mean_s": self.mean_s,
            "p50_s": percentile(lat, 50),
            "p99_s": percentile(lat, 99),
            "e2e_mean_s": sum(self.e2e) / len(self.e2e) if self.e2e else math.nan,
            "cold_starts": dict(self.loads),
            "migrations": self.migrations,
            "evictions": self.evictions,
            "no_capacity": self.no_capacity,
            "decisions": len(dec),
            "decision_p50_ms": percentile(dec, 50) * 1e3,
            "decision_max_ms": (dec[-1] * 1e3) if dec else math.nan,
            "wall_s": self.wall_s,
        }
