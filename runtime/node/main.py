"""The node's composition root: settings -> store, cache tiers, devices, bus -> ``NodeAgent``.

``run_node`` runs until ``stop`` is set (``sllm node start`` sets it on SIGINT/SIGTERM), then
drains the instances and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from runtime.node.agent import NodeAgent, instance_env, process_backend
from runtime.node.devices import Device, cpu_devices, cuda_devices
from runtime.node.instance_backend import InstanceBackend
from sllm.clock import SystemClock
from sllm.errors import ValidationFailed
from sllm.nats_bus import NatsBus
from sllm.settings import NodeSettings

if TYPE_CHECKING:
    from runtime.cache import BandwidthEstimator, TieredCache

log = logging.getLogger(__name__)


def dram_root(settings: NodeSettings) -> Path:
    """Shared memory directory of this node's DRAM tier: one per node and cache directory, so
    several nodes on one machine (tests, the migration demo) keep separate DRAM caches and a
    restarted node finds its DRAM cache again."""
    tag = xxhash.xxh3_64_hexdigest(str(Path(settings.cache_dir).resolve()).encode())[:10]
    return settings.dram_dir / f"sllm-{os.getuid()}-{settings.node_id}-{tag}"


def node_devices(settings: NodeSettings) -> list[Device]:
    gpus = cuda_devices()
    return gpus if gpus else cpu_devices(settings.cpu_slots)


# In a node's DRAM tier directory: the cache directory it belongs to (see sweep_orphan_dram).
OWNER_FILE = "cache-dir"


def sweep_orphan_dram(shm: Path = Path("/dev/shm")) -> list[Path]:
    """Remove this user's node DRAM tiers whose cache directory no longer exists (a node that
    ran on a temporary directory, now gone: no node can find that tier again, and shared memory
    is held until reboot otherwise). Directories without an owner file are left alone."""
    removed = []
    for root in sorted(shm.glob(f"sllm-{os.getuid()}-*")):
        try:
            cache_dir = (root / OWNER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if cache_dir and not Path(cache_dir).exists():
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
            log.info("removed orphaned DRAM tier %s (cache dir %s is gone)", root, cache_dir)
    return removed


def build_cache(settings: NodeSettings) -> tuple[TieredCache, BandwidthEstimator]:
    """(TieredCache, BandwidthEstimator) for ``settings``; the bandwidths are probed."""
    from runtime.cache import BandwidthEstimator, DramCache, SsdCache, TieredCache
    from runtime.cache.hugepages import dram_pages
    from runtime.store import open_store

    pages = dram_pages(settings.dram_dir)  # ValidationFailed: not a usable tmpfs directory
    log.info("DRAM tier in %s", pages.describe())
    store = open_store(settings.store)
    ssd_dir = Path(settings.cache_dir) / "ssd"
    ssd_dir.mkdir(parents=True, exist_ok=True)
    sweep_orphan_dram(settings.dram_dir)
    ssd = SsdCache(ssd_dir, settings.ssd_capacity)
    root = dram_root(settings)
    dram = DramCache(root, settings.dram_capacity)
    if settings.dram_preallocate and not dram.preallocate(settings.dram_preallocate):
        log.warning(
            "SLLM_DRAM_PREALLOCATE=%d does not fit beside the %d bytes the DRAM tier holds: "
            "no slab made",
            settings.dram_preallocate,
            dram.entries.used_bytes() + dram.pool_bytes(),
        )
    (root / OWNER_FILE).write_text(str(Path(settings.cache_dir).resolve()), encoding="utf-8")
    bandwidths = BandwidthEstimator()
    bandwidths.seed("store", settings.store_bandwidth)  # 0: keeps the default seed
    try:
        bandwidths.probe(ssd_dir=ssd_dir)
    except OSError as exc:
        log.warning("bandwidth probe failed, using default seeds: %s", exc)
    return TieredCache(store, ssd, dram, bandwidths), bandwidths


def image_cache_dir() -> Path:
    """Where the base image's root file system is kept between runs (XDG cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sllm"


def build_backend(
    settings: NodeSettings, devices: list[Device], dram_root: Path
) -> InstanceBackend:
    """The instance backend ``settings.instances`` asks for (blocking: may build the runtime
    image, minutes the first time). ``auto``: containers when podman is usable here."""
    from runtime.container.podman import engine_problem, find_podman

    env = instance_env(devices)
    mode = settings.instances
    problem = None
    if mode != "process":
        # GPUs would have to be passed into each container (CDI devices); not built yet
        gpus = any(d.kind == "cuda" for d in devices)
        problem = "instance containers do not get GPUs yet (CPU nodes only)" if gpus else None
        problem = problem or engine_problem()
    if mode == "container" and problem is not None:
        raise ValidationFailed(f"SLLM_INSTANCES=container: {problem}")
    if mode == "process" or problem is not None:
        if problem is not None:
            log.info("instances run as processes: %s", problem)
        return process_backend(settings, devices)
    from runtime.container.backend import ContainerBackend
    from runtime.container.images import ensure_runtime_image

    podman = find_podman()
    assert podman is not None
    image = settings.instance_image
    if not image:
        log.info("preparing the runtime image (the first time: minutes)")
        image = ensure_runtime_image(podman, image_cache_dir())
    log.info("instances run in containers of %s", image)
    return ContainerBackend(
        podman, image, settings.node_id, settings.cache_dir, dram_root, settings.pool_size, env
    )


async def run_node(settings: NodeSettings, stop: asyncio.Event, drain_s: float = 30.0) -> None:
    cache, bandwidths = await asyncio.to_thread(build_cache, settings)
    devices = await asyncio.to_thread(node_devices, settings)
    backend = await asyncio.to_thread(build_backend, settings, devices, cache.dram.root)
    bus = await NatsBus.connect(
        settings.nats_urls, name=f"sllm-node-{settings.node_id}", seed_file=settings.nats_seed_file
    )
    agent = NodeAgent(
        settings, bus, cache, devices, SystemClock(), bandwidths, cache.dram.entries.path,
        backend,
    )  # fmt: skip
    await agent.start()
    try:
        await stop.wait()
    finally:
        log.info("node %s stopping: draining instances (up to %.0fs)", settings.node_id, drain_s)
        await agent.stop(drain_s)
        await bus.close()
        await asyncio.to_thread(cache.close)
