"""The resume-cost fits survive a gateway restart: saved in the KeyValue bucket after each
observed migration, read back at start; a KV failure or a bad record never stops the gateway."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.instance_http import InstanceHttpClient
from gateway.migration.fits import MigrationFitStore, fit_key
from gateway.placement import PolicyScheduler
from gateway.scheduler.estimators import MigrationModels
from gateway.service import GatewayService
from sllm.bus import MemoryBus, MemoryKeyValue
from sllm.clock import ManualClock
from sllm.messages import (
    MigrateCmd,
    UnloadCmd,
)
from sllm.settings import GatewaySettings

from .conftest import two_nodes

CKPT = "checkpoints/a/0123:weird key"  # a KV key may not hold ':' or ' ': hashed


class BrokenKeyValue(MemoryKeyValue):
    async def put(self, key: str, value: bytes) -> None:
        raise ConnectionError("nats: no servers available")

    async def keys(self) -> list[str]:
        raise ConnectionError("nats: no servers available")


def observed(points: list[tuple[int, float]]) -> MigrationModels:
    models = MigrationModels()
    for tokens, seconds in points:
        models.observe(CKPT, tokens, seconds)
    return models


async def test_saved_fit_is_restored_and_keeps_learning() -> None:
    kv = MemoryKeyValue()
    models = observed([(100, 0.3), (300, 0.5)])
    await MigrationFitStore(kv, models).save(CKPT)
    restarted = MigrationModels()
    assert await MigrationFitStore(kv, restarted).load() == 1
    assert restarted.fits() == models.fits()
    assert restarted.fits()[CKPT] != MigrationModels().prior  # learned, not the prior
    # Later observations extend the same least-squares fit as if nothing restarted.
    restarted.observe(CKPT, 500, 0.9)
    assert restarted.fits() == observed([(100, 0.3), (300, 0.5), (500, 0.9)]).fits()


async def test_bad_records_are_skipped_and_good_ones_load(caplog: pytest.LogCaptureFixture) -> None:
    kv = MemoryKeyValue()
    await MigrationFitStore(kv, observed([(10, 1.0)])).save(CKPT)
    good = {"version": 1, "checkpoint": "other", "n": 1, "sx": 5, "sy": 2.0, "sxx": 25, "sxy": 10}
    await kv.put(fit_key("other"), json.dumps(good).encode())
    bad = {
        fit_key("x1"): b"not json",
        fit_key("x2"): json.dumps({**good, "checkpoint": "x2", "version": 99}).encode(),
        fit_key("x3"): json.dumps({**good, "checkpoint": "x3", "n": -1}).encode(),
        fit_key("x4"): json.dumps({**good, "checkpoint": "x4", "sy": "1"}).encode(),
        fit_key("x5"): json.dumps(good).encode(),  # another checkpoint's record
    }
    for key, value in bad.items():
        await kv.put(key, value)
    await kv.put("fn.chat", b"{}")  # the registry's keys are not fits
    models = MigrationModels()
    with caplog.at_level(logging.WARNING, "gateway.migration.fits"):
        assert await MigrationFitStore(kv, models).load() == 2
    assert set(models.fits()) == {CKPT, "other"}
    assert len([r for r in caplog.records if "skipping" in r.message]) == len(bad)


async def test_kv_failure_keeps_the_in_memory_fit(caplog: pytest.LogCaptureFixture) -> None:
    models = observed([(100, 0.3)])
    store = MigrationFitStore(BrokenKeyValue(), models)
    with caplog.at_level(logging.WARNING, "gateway.migration.fits"):
        await store.save(CKPT)
        assert await store.load() == 0
    assert CKPT in models.fits()
    assert ["not saved" in r.message for r in caplog.records] == [True, False]


async def test_observed_migration_is_saved() -> None:
    stage = await two_nodes(CKPT)
    models, kv, sent = MigrationModels(), stage.kv, stage.sent
    migrator = stage.migrator(models=models, fits=MigrationFitStore(kv, models))
    outcome = await migrator.migrate("a-1", "n2")
    assert outcome["moved"] == 1 and [type(c) for c in sent] == [MigrateCmd, UnloadCmd]
    restored = MigrationModels()
    assert await MigrationFitStore(kv, restored).load() == 1
    assert restored.fits() == models.fits() and restored.state(CKPT) == {
        "n": 1, "sx": 400.0, "sy": 0.7, "sxx": 160000.0, "sxy": 280.0,
    }  # fmt: skip


async def test_gateway_start_loads_the_fits_its_placements_use() -> None:
    kv = MemoryKeyValue()
    await MigrationFitStore(kv, observed([(100, 0.3), (300, 0.5)])).save(CKPT)
    scheduler = PolicyScheduler("locality+migration")
    settings = GatewaySettings.from_env({"SLLM_TOKEN": "t"})
    http = InstanceHttpClient(connect_timeout_s=1, read_timeout_s=1)
    gw = GatewayService(settings, MemoryBus(), kv, ManualClock(), http, scheduler)
    await gw.start()
    try:
        assert scheduler.migration.fits() == observed([(100, 0.3), (300, 0.5)]).fits()
        assert gw.controller.migrator is not None
        assert gw.controller.migrator.models is scheduler.migration
    finally:
        await gw.stop()
        await http.aclose()
