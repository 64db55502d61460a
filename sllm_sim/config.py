"""The simulator's configuration file (YAML), parsed strictly into frozen dataclasses.

Sizes take the spec's units ("13.4G", "512Gi" or bytes); bandwidths are sizes per second;
durations "60s", "5m" or seconds. An unknown key, a wrong type or an out-of-range value raises
``ValidationFailed`` naming the dotted key. See docs/scheduler.md for every field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sllm.errors import ValidationFailed
from sllm.settings import POLICIES
from sllm.spec import parse_duration, parse_memory


@dataclass(frozen=True)
class ClusterConfig:
    """``nodes`` identical nodes of ``accelerators`` devices each. Bandwidths are bytes/s into
    a device from each tier; a node loads one checkpoint at a time (they share the links)."""

    nodes: int = 4
    accelerators: int = 4
    dram_bytes: int = 512 * 10**9
    ssd_bytes: int = 2 * 10**12
    dram_bw: float = 20e9
    ssd_bw: float = 5e9
    store_bw: float = 1.25e9
    startup_s: float = 1.0
    reclaim_idle: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """A model: checkpoint size, devices per instance, and its token rates on one instance."""

    name: str
    bytes: int
    accelerators: int = 1
    prefill_tps: float = 5000.0
    decode_tps: float = 30.0


@dataclass(frozen=True)
class Distribution:
    """Token lengths: ``fixed`` (value), ``uniform`` (low..high) or ``lognormal`` (mean, sigma
    of the underlying normal chosen so the mean is ``mean``)."""

    kind: str = "fixed"
    value: float = 128.0
    low: float = 1.0
    high: float = 1.0
    mean: float = 128.0
    sigma: float = 0.5


@dataclass(frozen=True)
class WorkloadConfig:
    """``functions`` functions, each serving one model (assigned round-robin over the
    catalog), with Zipf(``zipf_s``) popularity over a seeded shuffle of ranks (a few functions
    take most calls, as in the Azure Functions trace). Arrivals at ``rps``: ``poisson`` or
    ``gamma`` with coefficient of variation ``cv`` (> 1 is bursty)."""

    functions: int = 32
    rps: float = 1.0
    duration_s: float = 1800.0
    arrivals: str = "poisson"
    cv: float = 1.0
    zipf_s: float = 1.0
    input_tokens: Distribution = Distribution(kind="fixed", value=256)
    output_tokens: Distribution = Distribution(kind="fixed", value=64)
    keep_alive_s: float = 60.0
    max_concurrency: int = 4
    max_instances: int = 4


@dataclass(frozen=True)
class MigrationConfig:
    """The true cost of a migration in the simulated world: resume = tokens / model prefill
    rate + ``overhead_s``; the migrated requests stall ``stall_s`` at the switch."""

    overhead_s: float = 0.5
    stall_s: float = 0.2


@dataclass(frozen=True)
class SimConfig:
    cluster: ClusterConfig
    models: tuple[ModelConfig, ...]
    workload: WorkloadConfig
    migration: MigrationConfig
    policies: tuple[str, ...]
    seed: int = 0
    rps_sweep: tuple[float, ...] = ()


def load_config(path: str) -> SimConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValidationFailed(f"cannot read simulator config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data)


def parse_config(data: object) -> SimConfig:
    root = _map(data, "config")
    _keys(
        root,
        "config",
        {"seed", "cluster", "models", "workload", "migration", "policies", "rps_sweep"},
    )
    models_raw = root.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ValidationFailed("models: must be a non-empty list of {name, bytes, ...}")
    models = tuple(_model(m, f"models[{i}]") for i, m in enumerate(models_raw))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValidationFailed(f"models: names must be unique, got {names}")
    cluster = _cluster(_map(root.get("cluster", {}), "cluster"))
    for m in models:
        if m.accelerators > cluster.accelerators:
            raise ValidationFailed(
                f"models: {m.name} needs {m.accelerators} accelerators but a node has "
                f"{cluster.accelerators}"
            )
    policies_raw = root.get("policies", ["locality+migration", "random", "download-every-time"])
    if not isinstance(policies_raw, list) or not policies_raw:
        raise ValidationFailed("policies: must be a non-empty list")
    for p in policies_raw:
        if p not in POLICIES:
            raise ValidationFailed(f"policies: unknown policy {p!r}; choose from {POLICIES}")
    sweep_raw = root.get("rps_sweep", [])
    if not isinstance(sweep_raw, list):
        raise ValidationFailed("rps_sweep: must be a list of request rates")
    sweep = tuple(_num(v, f"rps_sweep[{i}]", 1e-6, 1e6) for i, v in enumerate(sweep_raw))
    seed = root.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValidationFailed(f"seed: must be an integer, got {seed!r}")
    return SimConfig(
        cluster=cluster,
        models=models,
        workload=_workload(_map(root.get("workload", {}), "workload")),
        migration=_migration(_map(root.get("migration", {}), "migration")),
        policies=tuple(str(p) for p in policies_raw),
        seed=seed,
        rps_sweep=sweep,
    )


def _map(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValidationFailed(f"{key}: must be a mapping, got {type(value).__name__}")
    return value


def _keys(m: Mapping[str, Any], key: str, allowed: set[str]) -> None:
    unknown = sorted(set(m) - allowed)
    if unknown:
        raise ValidationFailed(f"{key}.{unknown[0]}: unknown key (allowed: {sorted(allowed)})")


def _num(value: object, key: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed(f"{key}: expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValidationFailed(f"{key}: must be in [{lo}, {hi}], got {value}")
    return float(value)


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(f"{key}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValidationFailed(f"{key}: must be in [{lo}, {hi}], got {value}")
    return value


def _size(value: object, key: str) -> int:
    n = parse_memory(value, key)
    if n <= 0:
        raise ValidationFailed(f"{key}: must be > 0, got {value!r}")
    return n


def _cluster(m: Mapping[str, Any]) -> ClusterConfig:
    _keys(
        m,
        "cluster",
        {"nodes", "accelerators", "dram", "ssd", "bandwidth", "startup", "reclaim_idle"},
    )
    d = ClusterConfig()
    bw = _map(m.get("bandwidth", {}), "cluster.bandwidth")
    _keys(bw, "cluster.bandwidth", {"dram", "ssd", "store"})
    reclaim = m.get("reclaim_idle", d.reclaim_idle)
    if not isinstance(reclaim, bool):
        raise ValidationFailed(f"cluster.reclaim_idle: expected true or false, got {reclaim!r}")
    return ClusterConfig(
        nodes=_int(m.get("nodes", d.nodes), "cluster.nodes", 1, 100_000),
        accelerators=_int(m.get("accelerators", d.accelerators), "cluster.accelerators", 1, 64),
        dram_bytes=_size(m.get("dram", d.dram_bytes), "cluster.dram"),
        ssd_bytes=_size(m.get("ssd", d.ssd_bytes), "cluster.ssd"),
        dram_bw=float(_size(bw.get("dram", int(d.dram_bw)), "cluster.bandwidth.dram")),
        ssd_bw=float(_size(bw.get("ssd", int(d.ssd_bw)), "cluster.bandwidth.ssd")),
        store_bw=float(_size(bw.get("store", int(d.store_bw)), "cluster.bandwidth.store")),
        startup_s=parse_duration(m.get("startup", d.startup_s), "cluster.startup"),
        reclaim_idle=reclaim,
    )


def _model(value: object, key: str) -> ModelConfig:
    m = _map(value, key)
    _keys(m, key, {"name", "bytes", "accelerators", "prefill_tps", "decode_tps"})
    name = m.get("name")
    if not isinstance(name, str) or not name:
        raise ValidationFailed(f"{key}.name: must be a non-empty string")
    if "bytes" not in m:
        raise ValidationFailed(f"{key}.bytes: missing (checkpoint size, e.g. 13.4G)")
    return ModelConfig(
        name=name,
        bytes=_size(m["bytes"], f"{key}.bytes"),
        accelerators=_int(m.get("accelerators", 1), f"{key}.accelerators", 1, 64),
        prefill_tps=_num(m.get("prefill_tps", 5000.0), f"{key}.prefill_tps", 1e-3, 1e9),
        decode_tps=_num(m.get("decode_tps", 30.0), f"{key}.decode_tps", 1e-3, 1e9),
    )


def _distribution(value: object, key: str) -> Distribution:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Distribution(kind="fixed", value=_num(value, key, 1, 1e7))
    m = _map(value, key)
    kind = m.get("dist", "fixed")
    fields = {"fixed": {"value"}, "uniform": {"low", "high"}, "lognormal": {"mean", "sigma"}}
    if kind not in fields:
        raise ValidationFailed(f"{key}.dist: must be one of {sorted(fields)}, got {kind!r}")
    _keys(m, key, fields[kind] | {"dist"})
    d = Distribution(
        kind=kind,
        value=_num(m.get("value", 128), f"{key}.value", 1, 1e7),
        low=_num(m.get("low", 1), f"{key}.low", 1, 1e7),
        high=_num(m.get("high", m.get("low", 1)), f"{key}.high", 1, 1e7),
        mean=_num(m.get("mean", 128), f"{key}.mean", 1, 1e7),
        sigma=_num(m.get("sigma", 0.5), f"{key}.sigma", 0, 5),
    )
    if d.high < d.low:
        raise ValidationFailed(f"{key}.high: must be >= low ({d.low}), got {d.high}")
    return d


def _workload(m: Mapping[str, Any]) -> WorkloadConfig:
    _keys(
        m,
        "workload",
        {
            "functions",
            "rps",
            "duration",
            "arrivals",
            "cv",
            "zipf_s",
            "input_tokens",
            "output_tokens",
            "keep_alive",
            "max_concurrency",
            "max_instances",
        },
    )
    d = WorkloadConfig()
    arrivals = m.get("arrivals", d.arrivals)
    if arrivals not in ("poisson", "gamma"):
        raise ValidationFailed(f"workload.arrivals: must be poisson or gamma, got {arrivals!r}")
    duration = parse_duration(m.get("duration", d.duration_s), "workload.duration")
    if duration <= 0:
        raise ValidationFailed("workload.duration: must be > 0")
    return WorkloadConfig(
        functions=_int(m.get("functions", d.functions), "workload.functions", 1, 10_000_000),
        rps=_num(m.get("rps", d.rps), "workload.rps", 1e-6, 1e6),
        duration_s=duration,
        arrivals=arrivals,
        cv=_num(m.get("cv", d.cv), "workload.cv", 0.01, 100),
        zipf_s=_num(m.get("zipf_s", d.zipf_s), "workload.zipf_s", 0, 10),
        input_tokens=_distribution(m.get("input_tokens", 256), "workload.input_tokens"),
        output_tokens=_distribution(m.get("output_tokens", 64), "workload.output_tokens"),
        keep_alive_s=parse_duration(m.get("keep_alive", d.keep_alive_s), "workload.keep_alive"),
        max_concurrency=_int(
            m.get("max_concurrency", d.max_concurrency), "workload.max_concurrency", 1, 10_000
        ),
        max_instances=_int(
            m.get("max_instances", d.max_instances), "workload.max_instances", 1, 100_000
        ),
    )


def _migration(m: Mapping[str, Any]) -> MigrationConfig:
    _keys(m, "migration", {"overhead", "stall"})
    d = MigrationConfig()
    return MigrationConfig(
        overhead_s=parse_duration(m.get("overhead", d.overhead_s), "migration.overhead"),
        stall_s=parse_duration(m.get("stall", d.stall_s), "migration.stall"),
    )
