"""Migrator.free_devices, which applies a scheduler's migration decision: a busy victim is
migrated (MigrateCmd), a victim that went idle since the decision is only stopped (UnloadCmd,
no target loaded), and one already gone frees its devices with no command at all."""

from __future__ import annotations

import asyncio

import pytest

from gateway.scheduler.types import Migration
from sllm.messages import (
    LoadCmd,
    MigrateCmd,
    UnloadCmd,
)

from .conftest import two_nodes

MOVE = Migration("a-1", "a", "n1", ("cpu:0",), "n2", ("cpu:0",), "dram", 1.0)


@pytest.mark.parametrize(("gateway_in_flight", "engine_in_flight"), [(1, 1), (0, 2), (1, 0)])
async def test_busy_victim_is_migrated(gateway_in_flight: int, engine_in_flight: int) -> None:
    # busy through this gateway, or only in its engine (streams moved onto it earlier)
    stage = await two_nodes(gateway_in_flight=gateway_in_flight, engine_in_flight=engine_in_flight)
    migrator, table, sent = stage.migrator(), stage.table, stage.sent
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert [type(c) for c in sent] == [MigrateCmd, UnloadCmd]
    assert "a-1" not in table.instances


async def test_victim_idle_since_the_decision_is_stopped_not_moved() -> None:
    stage = await two_nodes()
    migrator, table, sent = stage.migrator(), stage.table, stage.sent
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert [type(c) for c in sent] == [UnloadCmd]  # no MigrateCmd, no LoadCmd for a target
    assert "a-1" not in table.instances and migrator.models.fits() == {}


async def test_victim_already_gone_needs_no_command() -> None:
    stage = await two_nodes(gateway_in_flight=1, engine_in_flight=1)
    migrator, table, sent = stage.migrator(), stage.table, stage.sent
    table.forget("a-1")
    await asyncio.wait_for(migrator.free_devices(MOVE), 10)
    assert sent == [] and not any(isinstance(c, LoadCmd) for c in sent)
