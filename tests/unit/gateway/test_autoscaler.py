"""The autoscaler as scripted timelines: (time, observation) -> expected desired count."""

from __future__ import annotations

from gateway.autoscaler import Observation, ScalerState, decide, wanted
from sllm.spec import Scale

SCALE = Scale(min=0, max=4, target_concurrency=2, keep_alive_s=60.0)
WINDOW = 30.0


def run(
    timeline: list[tuple[float, Observation]],
    scale: Scale = SCALE,
    state: ScalerState | None = None,
) -> list[int]:
    state = state or ScalerState()
    out = []
    for now, obs in timeline:
        decision, state = decide(scale, obs, state, now, stable_window_s=WINDOW)
        out.append(decision.desired)
    return out


def obs(in_flight: int = 0, queued: int = 0, ready: int = 0, starting: int = 0) -> Observation:
    return Observation(in_flight=in_flight, queued=queued, ready=ready, starting=starting)


def test_wanted_is_ceil_of_load_over_target_clamped() -> None:
    assert wanted(SCALE, obs(in_flight=0)) == 0
    assert wanted(SCALE, obs(in_flight=1)) == 1
    assert wanted(SCALE, obs(in_flight=3, queued=2)) == 3
    assert wanted(SCALE, obs(in_flight=100)) == 4
    assert wanted(Scale(min=2, max=4, target_concurrency=2), obs()) == 2


def test_wake_from_zero_asks_for_exactly_one_instance_however_large_the_burst() -> None:
    decision, state = decide(SCALE, obs(queued=20), ScalerState(), 0.0, stable_window_s=WINDOW)
    assert decision.wake and decision.desired == 1
    # While it starts, the burst does not pile more loads on.
    decision, state = decide(SCALE, obs(queued=20, starting=1), state, 0.5, stable_window_s=WINDOW)
    assert not decision.wake and decision.desired == 1


def test_scales_up_at_once_when_an_instance_serves() -> None:
    assert run([(0, obs(queued=8)), (1, obs(in_flight=8, ready=1))]) == [1, 4]


def test_scale_down_waits_for_the_stable_window_and_uses_the_peak_seen() -> None:
    timeline = [
        (0, obs(in_flight=8, ready=4)),  # 4
        (1, obs(in_flight=2, ready=4)),  # want 1: window starts
        (10, obs(in_flight=4, ready=4)),  # want 2 inside the window
        (20, obs(in_flight=2, ready=4)),
        (31, obs(in_flight=2, ready=4)),  # window over: peak was 2
        (70, obs(in_flight=2, ready=2)),  # window restarts from 2; want 1
        (101, obs(in_flight=2, ready=2)),
    ]
    assert run(timeline) == [4, 4, 4, 4, 2, 2, 1]


def test_a_burst_inside_the_window_cancels_the_scale_down() -> None:
    timeline = [
        (0, obs(in_flight=8, ready=4)),
        (1, obs(in_flight=0, ready=4)),
        (20, obs(in_flight=8, ready=4)),
        (40, obs(in_flight=2, ready=4)),
        (60, obs(in_flight=2, ready=4)),
    ]
    assert run(timeline) == [4, 4, 4, 4, 4]


def test_scale_to_zero_only_after_keep_alive_without_load() -> None:
    scale = Scale(min=0, max=4, target_concurrency=2, keep_alive_s=5.0)
    timeline = [
        (0, obs(in_flight=1, ready=1)),
        (1, obs(ready=1)),  # idle from here; last active at 0
        (4.9, obs(ready=1)),
        (5.1, obs(ready=1)),
    ]
    assert run(timeline, scale) == [1, 1, 1, 0]


def test_keep_alive_restarts_with_each_request() -> None:
    scale = Scale(min=0, max=4, target_concurrency=2, keep_alive_s=5.0)
    timeline = [(0, obs(in_flight=1, ready=1)), (4, obs(in_flight=1, ready=1)), (8, obs(ready=1))]
    timeline.append((9.1, obs(ready=1)))
    assert run(timeline, scale) == [1, 1, 1, 0]


def test_min_replicas_are_never_scaled_away() -> None:
    scale = Scale(min=1, max=4, target_concurrency=2, keep_alive_s=1.0)
    assert run([(0, obs()), (100, obs(ready=1)), (1000, obs(ready=1))], scale) == [1, 1, 1]


def test_keep_alive_shorter_than_the_window_still_scales_many_to_zero() -> None:
    scale = Scale(min=0, max=4, target_concurrency=1, keep_alive_s=2.0)
    timeline = [(0, obs(in_flight=3, ready=3)), (1, obs(ready=3)), (3.5, obs(ready=3))]
    assert run(timeline, scale) == [3, 3, 0]


def test_manual_scale_sets_the_count_then_the_rules_apply() -> None:
    scale = Scale(min=0, max=4, target_concurrency=2, keep_alive_s=10.0)
    decision, state = decide(scale, obs(), ScalerState(manual=3), 0.0, stable_window_s=WINDOW)
    assert decision.desired == 3
    # No traffic: after keep_alive (counted from the manual scale) it goes to zero.
    decision, state = decide(scale, obs(ready=3), state, 5.0, stable_window_s=WINDOW)
    assert decision.desired == 3
    decision, state = decide(scale, obs(ready=3), state, 10.5, stable_window_s=WINDOW)
    assert decision.desired == 0


def test_manual_scale_is_clamped_to_max() -> None:
    decision, _ = decide(SCALE, obs(), ScalerState(manual=99), 0.0, stable_window_s=WINDOW)
    assert decision.desired == SCALE.max


def test_starting_instances_found_after_a_restart_are_kept() -> None:
    decision, _ = decide(SCALE, obs(queued=3, starting=2), ScalerState(desired=0), 0.0,
                         stable_window_s=WINDOW)  # fmt: skip
    assert decision.desired == 2
