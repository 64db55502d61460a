"""The node's devices and which instance holds each one.

A node with CUDA offers its GPUs ("cuda:0", ...); one without offers ``cpu_slots`` CPU slots
("cpu:0", ...), each able to hold one instance. ``DeviceTable`` is plain bookkeeping: the
supervisor allocates a device before it starts an instance and releases it when the instance
process is gone, whatever the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from sllm.errors import Conflict, NotFound, Unavailable
from sllm.messages import DeviceState

AUTO = ("", "auto", "any")


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "cuda" | "cpu"
    memory_bytes: int


def cuda_devices() -> list[Device]:
    """The CUDA GPUs present (imports torch: call once at node start)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        Device(f"cuda:{i}", "cuda", int(torch.cuda.get_device_properties(i).total_memory))
        for i in range(torch.cuda.device_count())
    ]


def cpu_devices(slots: int) -> list[Device]:
    """``slots`` CPU slots sharing the machine's memory (each reports an equal share)."""
    share = psutil.virtual_memory().total // max(slots, 1)
    return [Device(f"cpu:{i}", "cpu", share) for i in range(slots)]


def threads_per_slot(slots: int) -> int:
    """torch threads for an instance on a CPU slot: the cores split between the slots."""
    return max(1, (os.cpu_count() or 1) // max(slots, 1))


class DeviceTable:
    def __init__(self, devices: list[Device]) -> None:
        self.devices = {d.name: d for d in devices}
        self.holder: dict[str, str] = {}  # device -> instance id

    def allocate(self, wanted: str, instance_id: str) -> str:
        """Give ``wanted`` (or any free device for "", "auto", "any") to ``instance_id``."""
        if wanted in AUTO:
            for name in self.devices:
                if name not in self.holder:
                    self.holder[name] = instance_id
                    return name
            raise Unavailable(f"no free device on this node ({len(self.devices)} in use)")
        if wanted not in self.devices:
            known = ", ".join(self.devices) or "none"
            raise NotFound(f"device {wanted!r} does not exist on this node (devices: {known})")
        holder = self.holder.get(wanted)
        if holder is not None and holder != instance_id:
            raise Conflict(f"device {wanted} is in use by instance {holder}")
        self.holder[wanted] = instance_id
        return wanted

    def release(self, device: str, instance_id: str) -> None:
        if self.holder.get(device) == instance_id:
            del self.holder[device]

    def states(self) -> list[DeviceState]:
        return [
            DeviceState(d.name, d.kind, d.memory_bytes, self.holder.get(d.name))
            for d in self.devices.values()
        ]
