"""What the control loop asks of the gateway's place among several gateways: whether it decides
now, what the others have in flight, and where its decisions are kept (``gateway.peers``
answers for a gateway among several; ``Alone`` for one on its own, as unit tests build it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from sllm.messages import FunctionLoad, StartRecord


class Role(Protocol):
    def deciding(self) -> bool:
        """Whether this gateway may scale and place now (it holds the lease)."""
        ...

    def others_load(self) -> Mapping[str, FunctionLoad]:
        """Requests in flight and queued per function at the other gateways."""
        ...

    def desired(self, function: str, desired: int) -> None:
        """The function's desired count changed (kept for the next leader)."""
        ...

    def forget(self, function: str) -> None:
        """The function is gone."""
        ...

    async def booked(self, record: StartRecord) -> bool:
        """A load is about to be sent: record it for the next leader. False: do not send it
        (this gateway no longer decides)."""
        ...

    def gone(self, instance_id: str) -> None:
        """A booked instance was seen ready, failed, stopped or was given up."""
        ...


class Alone:
    """A gateway on its own: it always decides, and keeps nothing for a successor."""

    def deciding(self) -> bool:
        return True

    def others_load(self) -> Mapping[str, FunctionLoad]:
        return {}

    def desired(self, function: str, desired: int) -> None:
        return None

    def forget(self, function: str) -> None:
        return None

    async def booked(self, record: StartRecord) -> bool:
        return True

    def gone(self, instance_id: str) -> None:
        return None
