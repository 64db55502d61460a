"""The leader lease as scripted timelines (gateway.lease, pure): who may decide, when a write is
due, and that an old leader stops acting before anyone else can take the key."""

from __future__ import annotations

import pytest

from gateway.leadership import Leadership
from gateway.lease import (
    FOLLOWER,
    Action,
    LeaseConfig,
    LeaseState,
    Seen,
    decide,
    leading,
    on_written,
)
from sllm.bus import MemoryKeyValue
from sllm.clock import ManualClock
from sllm.errors import Unavailable

C = LeaseConfig(ttl_s=3.0, renew_s=1.0, poll_s=0.5, margin_s=0.5)


def _take(at: float, revision: int = 10) -> LeaseState:
    action, state = decide(C, "a", FOLLOWER, Seen(None), at)
    assert action == Action("create")
    return on_written(state, action, revision, at)


def test_nobody_holds_it_so_take_it() -> None:
    state = _take(0.0)
    assert leading(C, state, 0.0) and state.term == 10


def test_the_holder_renews_when_due_and_keeps_its_term() -> None:
    state = _take(0.0)
    assert decide(C, "a", state, Seen("a", 10), 0.5) == (Action("wait"), state)
    action, state = decide(C, "a", state, Seen("a", 10), 1.0)
    assert action == Action("renew", 10)
    state = on_written(state, action, 11, 1.0)
    assert state == LeaseState(11, 1.0, term=10)
    assert leading(C, state, 3.4) and not leading(C, state, 3.5)


def test_a_leader_that_cannot_write_stops_before_the_key_can_expire() -> None:
    """NATS is unreachable from time 0.2: reads fail, renewals are never folded in. The leader
    acts until 2.5 (written_at + ttl - margin); the server cannot expire the key before 3.0."""
    state = _take(0.0)
    for now in (0.5, 1.0, 1.5, 2.0, 2.4):
        action, state = decide(C, "a", state, None, now)
        assert action.kind == "wait" and leading(C, state, now)
    action, state = decide(C, "a", state, None, 2.5)
    assert state == FOLLOWER and not leading(C, state, 2.5)


def test_a_follower_waits_while_another_holds_it_then_takes_it_when_it_expires() -> None:
    for now in (0.0, 0.5, 1.0):
        action, state = decide(C, "b", FOLLOWER, Seen("a", 10), now)
        assert action.kind == "wait" and state == FOLLOWER
    action, state = decide(C, "b", FOLLOWER, Seen(None), 3.5)
    assert action == Action("create")
    state = on_written(state, action, 12, 3.5)
    assert leading(C, state, 3.5) and state.term == 12


def test_losing_a_race_leaves_a_follower() -> None:
    action, state = decide(C, "b", FOLLOWER, Seen(None), 0.0)
    assert on_written(state, action, None, 0.0) == FOLLOWER  # StaleRevision: a took it first


def test_a_leader_that_sees_another_holder_steps_down_at_once() -> None:
    state = _take(0.0)
    action, state = decide(C, "a", state, Seen("b", 20), 0.5)
    assert action.kind == "wait" and not leading(C, state, 0.5)


def test_its_own_value_at_an_unknown_revision_is_renewed_before_acting() -> None:
    """A write whose reply was lost: the key names this gateway at a revision it never saw.
    It does not act on it until a renewal at that revision succeeds."""
    state = _take(0.0)
    action, state = decide(C, "a", state, Seen("a", 11), 1.0)
    assert action == Action("renew", 11) and not leading(C, state, 1.0)
    state = on_written(state, action, 12, 1.0)
    assert leading(C, state, 1.0) and state.term == 12


def test_a_failed_renewal_of_an_expired_value_means_someone_else_has_it() -> None:
    state = _take(0.0)
    action, state = decide(C, "a", state, Seen("a", 10), 1.0)
    assert on_written(state, action, None, 1.0) == FOLLOWER


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl_s": 1.0, "renew_s": 1.0}, "renew_s"),
        ({"renew_s": 1.0, "poll_s": 2.0}, "poll_s"),
    ],
)
def test_config_is_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LeaseConfig(**kwargs)


class ReplyLost(MemoryKeyValue):
    """A bucket whose next update is made but answers as if NATS went away (its reply lost)."""

    lose_next = False

    async def update(self, key: str, value: bytes, last: int) -> int:
        revision = await super().update(key, value, last)
        if self.lose_next:
            self.lose_next = False
            raise Unavailable("NATS is not connected (the reply was lost)")
        return revision


async def test_a_lost_renewal_reply_is_a_new_term_and_on_change_hears_it() -> None:
    # seen in a fault run (NATS restarted): the gateway renewed again at the revision the key
    # showed and led on at a new term, but nobody was told, so it never decided again
    kv, clock = ReplyLost(), ManualClock()
    told: list[tuple[bool, int]] = []
    lead = Leadership(kv, "a", clock, C, on_change=lambda leader, term: told.append((leader, term)))
    await lead.step()
    first = lead.term
    assert told == [(True, first)]
    clock.advance(1.0)
    kv.lose_next = True
    await lead.step()  # the renewal lands, its reply does not: still leading by time
    assert lead.leader and told == [(True, first)]
    clock.advance(0.5)
    await lead.step()  # its own value at an unknown revision: renewed there, a new term
    assert lead.leader and lead.term > first
    assert told == [(True, first), (True, lead.term)]
    clock.advance(0.5)
    await lead.step()  # a plain renewal keeps the term: nothing more to tell
    assert told == [(True, first), (True, lead.term)]
