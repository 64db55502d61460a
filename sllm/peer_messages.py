"""Messages between gateways (issue 16), registered with the rest in ``sllm.messages``: the
load reports followers send the leader, the lease's value, the manual scales handed to the
leader, and the scale state the leader keeps in KV for its successor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FunctionLoad:
    """Requests of one function at one gateway: proxied now, and waiting in its queue."""

    in_flight: int
    queued: int


@dataclass(frozen=True)
class GatewayLoad:
    """A gateway's report to the leader (every ``report_s``, as Knative's activators report to
    its autoscaler): ``functions`` with any request in flight or queued; ``seq`` grows by one per
    report of this gateway, so the leader keeps only the newest."""

    gateway_id: str
    seq: int
    functions: dict[str, FunctionLoad]


@dataclass(frozen=True)
class LeaseRecord:
    """The value of the leader lease: who holds it. Its revision in the bucket is the term."""

    holder: str


@dataclass(frozen=True)
class ScaleRequest:
    """``/system/scale`` received by a gateway that does not lead, for the leader to apply;
    answered with a CmdReply."""

    function: str
    replicas: int


@dataclass(frozen=True)
class ScaleRecord:
    """A function's desired instance count as the leader last decided it (gateway.scale_state);
    ``term``: the leader's lease term when it wrote it."""

    desired: int
    term: int


@dataclass(frozen=True)
class StartRecord:
    """A load the leader is sending, kept until a heartbeat or event shows the instance, so a
    gateway that takes over counts it instead of starting another (gateway.scale_state)."""

    instance_id: str
    function: str
    node: str
    device: str
    revision: int
    term: int
