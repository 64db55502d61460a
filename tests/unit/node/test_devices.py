"""Device bookkeeping: allocation, conflicts, release."""

from __future__ import annotations

import pytest

from runtime.node.devices import Device, DeviceTable, cpu_devices, threads_per_slot
from sllm.errors import Conflict, NotFound, Unavailable


def table() -> DeviceTable:
    return DeviceTable([Device("cpu:0", "cpu", 1), Device("cpu:1", "cpu", 1)])


def test_auto_picks_free_devices_in_order_then_refuses() -> None:
    t = table()
    assert t.allocate("", "a") == "cpu:0"
    assert t.allocate("auto", "b") == "cpu:1"
    with pytest.raises(Unavailable, match="no free device"):
        t.allocate("", "c")


def test_named_device_in_use_is_a_conflict_naming_the_holder() -> None:
    t = table()
    t.allocate("cpu:1", "a")
    assert t.allocate("cpu:1", "a") == "cpu:1"  # the same instance again: idempotent
    with pytest.raises(Conflict, match="in use by instance a"):
        t.allocate("cpu:1", "b")


def test_unknown_device_is_named() -> None:
    with pytest.raises(NotFound, match=r"cuda:3.*cpu:0, cpu:1"):
        table().allocate("cuda:3", "a")


def test_release_frees_only_the_holders_device() -> None:
    t = table()
    t.allocate("cpu:0", "a")
    t.release("cpu:0", "b")
    assert t.states()[0].instance_id == "a"
    t.release("cpu:0", "a")
    assert [s.instance_id for s in t.states()] == [None, None]


def test_cpu_slots_and_threads() -> None:
    assert [d.name for d in cpu_devices(3)] == ["cpu:0", "cpu:1", "cpu:2"]
    assert threads_per_slot(1) >= 1 and threads_per_slot(1000) == 1
