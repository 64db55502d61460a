"""Learned bandwidths: moving average per tier, tiny transfers ignored, probe seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.cache.bandwidth import BandwidthEstimator, HopStat

MiB = 1 << 20


def test_moving_average_per_tier() -> None:
    est = BandwidthEstimator(seeds={"store": 100e6}, alpha=0.5)
    est.observe(HopStat("store", 300 * MiB, 300 * MiB / 300e6))
    assert est.get("store") == pytest.approx(200e6)
    est.observe(HopStat("ssd", 10 * MiB, 0.01))
    assert est.get("ssd") == pytest.approx(10 * MiB / 0.01)  # first observation: taken as is
    assert est.snapshot() == {"store": pytest.approx(200e6), "ssd": pytest.approx(10 * MiB / 0.01)}


@pytest.mark.parametrize("stat", [HopStat("store", 1000, 0.001), HopStat("store", 8 * MiB, 0.0)])
def test_tiny_or_instant_transfers_are_ignored(stat: HopStat) -> None:
    est = BandwidthEstimator(seeds={"store": 100e6})
    est.observe(stat)
    assert est.get("store") == 100e6


def test_probe_seeds_dram_and_ssd(tmp_path: Path) -> None:
    est = BandwidthEstimator(seeds={})
    measured = est.probe(ssd_dir=tmp_path, nbytes=4 * MiB)
    assert set(measured) == {"dram", "ssd"} and all(v > 0 for v in measured.values())
    assert est.snapshot() == measured
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_alpha_out_of_range() -> None:
    with pytest.raises(ValueError, match="alpha"):
        BandwidthEstimator(alpha=0)
