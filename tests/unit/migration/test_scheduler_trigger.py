"""The controller applies a placement that carries a Migration: the victim moves away first
(through the Migrator), then the new instance loads on the freed device; a failed migration
places the instance elsewhere."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from gateway.controller import Controller
from gateway.dispatcher import Dispatcher
from gateway.instances import LAUNCH_GRACE_S, InstanceTable
from gateway.metrics import GatewayMetrics
from gateway.migration.orchestrator import MigrationFailed
from gateway.scheduler.types import Migration, NoCapacity, Placement
from sllm.clock import Clock, ManualClock, SystemClock
from sllm.messages import CmdReply, DeviceState, LoadCmd, NodeHeartbeat
from sllm.spec import FunctionRecord, FunctionSpec

RECORD = FunctionRecord(FunctionSpec(name="b", model="m", handler="chat"), "ck/b", 10)
MOVE = Migration("a-1", "a", "n1", ("cpu:0",), "n2", ("cpu:0",), "dram", 1.0)


class Registry:
    def all(self) -> list[FunctionRecord]:
        return [RECORD]

    def find(self, name: str) -> FunctionRecord | None:
        return RECORD if name == "b" else None


class Commands:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    async def send(self, node: str, command: object) -> CmdReply:
        self.sent.append((node, command))
        return CmdReply(ok=True)


class Scheduler:
    policy = "locality+migration"

    def __init__(self, placements: list[Placement | NoCapacity]) -> None:
        self.placements = placements
        self.excluded: list[set[str]] = []

    def place(self, *args: Any, **kwargs: Any) -> Placement | NoCapacity:
        self.excluded.append(set(args[4]))
        return self.placements.pop(0)


class FakeMigrator:
    def __init__(self, fail: bool, done: asyncio.Event | None = None) -> None:
        self.fail = fail
        self.done = done
        self.freed: list[Migration] = []

    def moving(self, function: str) -> bool:
        return False

    async def free_devices(self, migration: Migration) -> None:
        self.freed.append(migration)
        if self.done is not None:
            await self.done.wait()
        if self.fail:
            raise MigrationFailed("target instance failed before the switch")


def controller(
    scheduler: Scheduler, migrator: FakeMigrator, clock: Clock | None = None
) -> tuple[Controller, Commands]:
    table = InstanceTable()
    clock = clock or SystemClock()
    commands = Commands()
    ctl = Controller(
        Registry(),  # type: ignore[arg-type]
        table,
        Dispatcher(table, clock, 10, 10.0, on_wait=lambda fn: None),
        commands,  # type: ignore[arg-type]
        scheduler,
        clock,
        GatewayMetrics(),
        stable_window_s=10.0,
        drain_s=1.0,
        migrator=migrator,  # type: ignore[arg-type]
    )
    return ctl, commands


async def settle(ctl: Controller) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await ctl.stop()


async def test_migration_runs_before_the_load_on_the_freed_device() -> None:
    placement = Placement("n1", ("cpu:0",), "dram", 1.5, "locality+migration", migration=MOVE)
    migrator = FakeMigrator(fail=False)
    ctl, commands = controller(Scheduler([placement]), migrator)
    assert ctl.launcher.launch(RECORD)
    await settle(ctl)
    assert migrator.freed == [MOVE]
    [(node, load)] = commands.sent
    assert node == "n1" and isinstance(load, LoadCmd) and load.device == "cpu:0"


async def test_failed_migration_places_the_instance_elsewhere() -> None:
    moved = Placement("n1", ("cpu:0",), "dram", 1.5, "locality+migration", migration=MOVE)
    other = Placement("n3", ("cpu:1",), "store", 3.0, "locality+migration")
    scheduler = Scheduler([moved, other])
    ctl, commands = controller(scheduler, FakeMigrator(fail=True))
    assert ctl.launcher.launch(RECORD)
    await settle(ctl)
    assert scheduler.excluded[1] == {"n1"}
    [(node, load)] = commands.sent
    assert node == "n3" and isinstance(load, LoadCmd) and load.device == "cpu:1"


async def test_booked_instance_outlives_a_slow_migration() -> None:
    # The new instance is booked on the victim's device at once, but its load goes out only
    # once the victim has moved away: heartbeats meanwhile do not show it, and must not make
    # the gateway drop it as gone (bug: dropped after LAUNCH_GRACE_S, then loaded untracked).
    placement = Placement("n1", ("cpu:0",), "dram", 1.5, "locality+migration", migration=MOVE)
    done = asyncio.Event()
    clock = ManualClock()
    ctl, commands = controller(Scheduler([placement]), FakeMigrator(False, done), clock)
    assert ctl.launcher.launch(RECORD)
    for _ in range(20):
        await asyncio.sleep(0)
    (booked,) = ctl._table.of("b")
    hb = NodeHeartbeat("n1", 1, [DeviceState("cpu:0", "cpu", 0, "a-1")], [], {}, {})
    for seq in range(3):
        clock.advance(LAUNCH_GRACE_S)
        ctl.on_heartbeat(replace(hb, seq=seq + 1))
        assert ctl._table.of("b") == [booked] and booked.state == "starting"
    done.set()
    await settle(ctl)
    [(node, load)] = commands.sent
    assert node == "n1" and isinstance(load, LoadCmd) and load.instance_id == booked.instance_id
    assert ctl._table.of("b") == [booked]
    # From the load on, the grace runs as for any launch.
    clock.advance(LAUNCH_GRACE_S + 1)
    ctl.on_heartbeat(replace(hb, seq=9))
    assert ctl._table.of("b") == []
