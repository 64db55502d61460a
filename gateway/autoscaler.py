"""The autoscaler: a pure decider (STYLE.md 1-3), ``decide(scale, observation, state, now)``.

It never reads a clock or the network; the control loop gathers an ``Observation`` per function,
calls ``decide`` and applies the returned ``desired`` count by loading or draining instances.

Rules (Knative's KPA, simplified):
- ``want = ceil((in_flight + queued) / target_concurrency)`` clamped to ``[min, max]``.
- Scale up at once. Out of zero (nothing ready, nothing starting, a request waiting) the fast
  path asks for exactly one instance: one wake per burst, however many requests arrived together.
- While every instance is still starting, hold: the queued requests will be released to the one
  that comes up, and piling more loads on a cold node only slows the first one.
- Scale down only after ``want`` has stayed below the current count for ``stable_window_s``;
  then to the highest ``want`` seen during that window (so a dip between bursts does not flap).
- Scale to zero only after ``keep_alive_s`` with no request in flight or queued.
- Manual scaling (``/system/scale``) sets the count now; the rules above apply from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from sllm.spec import Scale


@dataclass(frozen=True)
class Observation:
    """What the control loop saw for one function at one instant (counts of requests and
    instances of the function's current revision)."""

    in_flight: int
    queued: int
    ready: int
    starting: int


@dataclass(frozen=True)
class ScalerState:
    """Carried between decisions. Times are on the injected clock's scale (seconds)."""

    desired: int = 0
    last_active: float = 0.0
    down_since: float | None = None
    window_peak: int = 0
    manual: int | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    wake: bool = False
    reason: str = ""


def wanted(scale: Scale, obs: Observation) -> int:
    """Instances the current load needs, clamped to the spec's bounds."""
    load = obs.in_flight + obs.queued
    raw = math.ceil(load / scale.target_concurrency) if load > 0 else 0
    return max(scale.min, min(scale.max, raw))


def decide(
    scale: Scale,
    obs: Observation,
    state: ScalerState,
    now: float,
    *,
    stable_window_s: float,
) -> tuple[Decision, ScalerState]:
    """One step of the autoscaler for one function; returns the decision and the next state."""
    active = obs.in_flight + obs.queued > 0
    last_active = now if active else state.last_active
    current = state.desired
    if state.manual is not None:
        # A manual scale counts as activity, so keep_alive starts from it.
        current = max(0, min(scale.max, state.manual))
        last_active = now
        state = replace(state, manual=None, down_since=None, window_peak=0)
    want = wanted(scale, obs)

    if obs.ready == 0 and obs.starting == 0 and obs.queued > 0 and current == 0:
        desired = max(1, scale.min)
        next_state = ScalerState(desired, last_active, None, 0)
        return Decision(desired, wake=True, reason="wake from zero"), next_state

    if obs.ready == 0 and obs.starting > 0 and want > current:
        held = max(current, min(want, obs.starting))
        return Decision(held, reason="hold while starting"), ScalerState(held, last_active, None, 0)

    if want >= current:
        reason = "scale up" if want > current else "steady"
        return Decision(want, reason=reason), ScalerState(want, last_active, None, 0)

    # want < current: wait out the stable window; zero only after keep_alive without load.
    down_since = state.down_since if state.down_since is not None else now
    peak = max(state.window_peak, want) if state.down_since is not None else want
    desired, reason = current, "stable window"
    if peak == 0 and now - last_active >= scale.keep_alive_s:
        desired, reason = 0, "scale to zero"
    elif now - down_since >= stable_window_s and max(peak, 1) < current:
        desired, reason = max(peak, 1), "scale down"
    elif peak == 0:
        reason = "keep alive"
    if desired < current:
        return Decision(desired, reason=reason), ScalerState(desired, last_active, None, 0)
    return Decision(desired, reason=reason), ScalerState(desired, last_active, down_since, peak)
