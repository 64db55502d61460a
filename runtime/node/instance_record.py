"""One instance as the node's supervisor keeps it: its load's progress, its process, its
counters, and the form heartbeats carry (``to_state``)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from runtime.node.worker_process import WorkerProcess
from sllm.instance_auth import new_secret
from sllm.messages import InstanceState, InstanceStatus
from sllm.spec import FunctionRecord


class Laps:
    """Seconds between successive marks, by the name of the stage each mark ends (a load's
    stages on the node, reported with the instance's own timings)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.seconds[stage] = now - self.last
        self.last = now


@dataclass
class Instance:
    instance_id: str
    function: str
    device: str
    record: FunctionRecord
    state: InstanceStatus = "loading"
    address: str | None = None
    tier: str = ""
    load_s: float = 0.0
    pre_started: bool = False
    backend: str = ""  # chosen once the checkpoint is fetched (runtime.backend.choice)
    backend_reason: str = ""
    engine: str = ""  # vLLM: built, or kept / reloaded from an idle process's warm engine
    queued: bool = False  # waiting for a stopping instance to give its device back
    timings: dict[str, float] = field(default_factory=dict)
    worker: WorkerProcess | None = None
    fetched: bool = False
    stopping: bool = False
    error: str = ""
    error_code: str = ""
    in_flight: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    task: asyncio.Task[None] | None = None
    drain_started: asyncio.Event = field(default_factory=asyncio.Event)
    # what every caller of the instance must send (sllm.instance_auth)
    secret: str = field(default_factory=new_secret, repr=False)

    def to_state(self) -> InstanceState:
        return InstanceState(
            instance_id=self.instance_id,
            function=self.function,
            device=self.device,
            state=self.state,
            address=self.address,
            in_flight=self.in_flight,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            revision=self.record.revision,
            secret=self.secret if self.address else "",
            backend=self.backend,
            backend_reason=self.backend_reason,
        )
