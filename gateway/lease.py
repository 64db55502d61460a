"""The leader lease, as a pure decider (STYLE.md 1): which gateway decides scale and placement.

Mechanism: one key (``leader``) in a JetStream KV bucket whose values expire after ``ttl_s``
(the bucket's max age), written only with revision checks:
- a gateway takes the lease by ``create`` (succeeds only while the key has no value: nobody
  holds it, or the holder's last write expired);
- the holder renews every ``renew_s`` by ``update`` at the revision it last wrote (fails if
  anyone else wrote since), which also restarts the value's age;
- a holder that stops renewing (dead, hung, cut off from NATS) loses the key ``ttl_s`` after its
  last write reached the server; a follower polling the key then takes it.

Why this and not another JetStream mechanism: KV with max age and compare-and-set is one bucket
that the gateways already know how to open (the registry is one), replicated like every bucket
(``SLLM_NATS_REPLICAS``), readable by anyone for "who leads", and its revision is a fencing
token for free (it only grows). A per-message TTL (nats-server 2.11+) would not restart on
``update``; a consumer-based election (one active pull consumer) leaves no value to read.

Safety: a gateway counts itself leader only until ``written_at + ttl_s - margin_s``, where
``written_at`` is the local time *before* its last successful write was sent. The server
stamps the value on arrival, later than that, so it expires no earlier than ``written_at +
ttl_s``: the old leader has stopped acting before anyone else can create the key. Liveness: a
follower takes over at most ``ttl_s + poll_s`` after the leader's last renewal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LeaseConfig:
    """Seconds. Defaults: 3 s TTL renewed every 1 s (two renewals may fail before the lease
    lapses), polled every 0.5 s: a dead leader is replaced within ~3.5 s, under the 5 s within
    which scaling must continue."""

    ttl_s: float = 3.0
    renew_s: float = 1.0
    poll_s: float = 0.5
    margin_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.renew_s < self.ttl_s - self.margin_s:
            raise ValueError(
                f"lease: renew_s ({self.renew_s}) must be under ttl_s - margin_s "
                f"({self.ttl_s} - {self.margin_s})"
            )
        if not 0 < self.poll_s <= self.renew_s:
            raise ValueError(f"lease: poll_s ({self.poll_s}) must be in (0, renew_s]")


@dataclass(frozen=True)
class Seen:
    """What a read of the key found: its holder and revision, or no value."""

    holder: str | None
    revision: int | None = None


@dataclass(frozen=True)
class LeaseState:
    """This gateway's view. ``revision``: its last successful write (None: it holds nothing);
    ``written_at``: local time just before that write was sent; ``term``: the revision at which
    it took the lease (grows with every change of leader)."""

    revision: int | None = None
    written_at: float | None = None
    term: int = 0


@dataclass(frozen=True)
class Action:
    """``create`` the key, ``renew`` it at ``revision``, or ``wait``."""

    kind: Literal["create", "renew", "wait"]
    revision: int | None = None


WAIT = Action("wait")
FOLLOWER = LeaseState()


def leading(config: LeaseConfig, state: LeaseState, now: float) -> bool:
    return state.written_at is not None and now < state.written_at + config.ttl_s - config.margin_s


def decide(
    config: LeaseConfig, me: str, state: LeaseState, seen: Seen | None, now: float
) -> tuple[Action, LeaseState]:
    """One step. ``seen`` is None when the read failed (NATS unreachable): a leader keeps
    leading until its lease lapses by time; a follower waits."""
    holding = leading(config, state, now)
    if seen is None:
        return WAIT, state if holding else FOLLOWER
    if holding and seen.holder == me and seen.revision == state.revision:
        assert state.written_at is not None  # holding
        due = now - state.written_at >= config.renew_s
        return (Action("renew", state.revision) if due else WAIT), state
    if seen.holder is None:
        return Action("create"), FOLLOWER
    if seen.holder == me:
        # Ours, at a revision we did not record (a write whose reply was lost, or this id
        # restarted): renew at that revision; if it succeeds, the lease is ours from now.
        return Action("renew", seen.revision), FOLLOWER
    return WAIT, FOLLOWER


def on_written(
    state: LeaseState, action: Action, revision: int | None, sent_at: float
) -> LeaseState:
    """Fold a write's outcome in: ``revision`` is the new revision, or None when the write lost
    (the key moved: someone else holds it). A write that failed for another reason (NATS down)
    is not folded in: the lease then lapses by time."""
    if action.kind == "wait":
        return state
    if revision is None:
        return FOLLOWER
    term = state.term if state.revision is not None else revision
    return LeaseState(revision, sent_at, term)
