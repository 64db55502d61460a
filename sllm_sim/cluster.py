"""Simulated nodes: devices, LRU DRAM/SSD caches, a one-at-a-time load pipeline, and the
indexes the scheduler reads (holders per checkpoint, nodes with room), kept up to date as the
simulation runs so a decision on 1,000 nodes does not rebuild every node's view."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from gateway.scheduler.types import ClusterSnapshot, MigrationFit, NodeView, RunningInstance
from sllm_sim.config import ClusterConfig


class LruCache:
    """Checkpoint key -> bytes, least recently used first; ``pinned`` keys are never evicted
    (DRAM copies mapped by running instances)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.pinned: dict[str, int] = {}

    def touch(self, key: str) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)

    def insert(self, key: str, nbytes: int) -> list[str] | None:
        """Add ``key`` (most recent), evicting unpinned LRU entries; returns the evicted
        keys, or None when it cannot fit (too large, or the rest is pinned)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return []
        if nbytes > self.capacity:
            return None
        need = self.used + nbytes - self.capacity
        victims: list[str] = []
        if need > 0:
            freed = 0
            for k, size in self.entries.items():
                if k in self.pinned:
                    continue
                victims.append(k)
                freed += size
                if freed >= need:
                    break
            if freed < need:
                return None
            for k in victims:
                self.used -= self.entries.pop(k)
        self.entries[key] = nbytes
        self.used += nbytes
        return victims

    def pin(self, key: str) -> None:
        self.pinned[key] = self.pinned.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        left = self.pinned.get(key, 0) - 1
        if left > 0:
            self.pinned[key] = left
        else:
            self.pinned.pop(key, None)


@dataclass
class SimInstance:
    """An instance; ``state``: waiting (its devices are being freed by a migration), loading,
    ready, migrating (its requests are being moved to another node)."""

    instance_id: str
    function: int
    checkpoint: str
    nbytes: int
    node: str
    devices: tuple[str, ...]
    state: str = "loading"
    active: list[int] = field(default_factory=list)
    idle_since: float = 0.0
    idle_epoch: int = 0
    pinned: bool = False


@dataclass
class LoadJob:
    """Load ``checkpoint`` onto ``instance``'s devices; ``force_store`` for the baseline."""

    instance: SimInstance
    checkpoint: str
    nbytes: int
    force_store: bool
    for_migration: int = -1  # migration id when this loads a migration target
    est_s: float = 0.0  # estimated duration when queued (for the node's load_queue_s)
    tier: str = ""  # where it was read from, set when it starts
    transfer_s: float = 0.0


class SimNode:
    def __init__(self, node_id: str, config: ClusterConfig) -> None:
        self.node_id = node_id
        self.devices = tuple(f"gpu{i}" for i in range(config.accelerators))
        self.free: list[str] = list(self.devices)
        self.dram = LruCache(config.dram_bytes)
        self.ssd = LruCache(config.ssd_bytes)
        self.instances: dict[str, SimInstance] = {}
        self.jobs: list[LoadJob] = []  # queued, not started
        self.queued_s = 0.0  # estimated seconds of the queued jobs
        self.current: LoadJob | None = None
        self.current_end = 0.0

    def holds(self, checkpoint: str) -> bool:
        return checkpoint in self.dram.entries or checkpoint in self.ssd.entries

    def take(self, devices: tuple[str, ...]) -> None:
        """Book ``devices``; a device that is not free is a double booking (a scheduler bug)."""
        for dev in devices:
            if dev not in self.free:
                raise AssertionError(f"{self.node_id}/{dev} booked twice")
            self.free.remove(dev)


class RoomIndex(Collection[str]):
    """Nodes with room, those without a load in progress first (each in the order they got
    room): the scheduler's store scan then stops at the first node, as no queue beats none."""

    def __init__(self) -> None:
        self.idle: dict[str, None] = {}
        self.loading: dict[str, None] = {}

    def put(self, node_id: str, loading: bool) -> None:
        if loading:
            self.idle.pop(node_id, None)
            self.loading[node_id] = None
        else:
            self.loading.pop(node_id, None)
            self.idle[node_id] = None

    def discard(self, node_id: str) -> None:
        self.idle.pop(node_id, None)
        self.loading.pop(node_id, None)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.idle or node_id in self.loading

    def __iter__(self) -> Iterator[str]:
        yield from self.idle
        yield from self.loading

    def __len__(self) -> int:
        return len(self.idle) + len(self.loading)


class SimCluster:
    """The nodes plus the scheduler's indexes, refreshed lazily before each decision.

    ``tokens_of(instance, now)`` gives the tokens (in + out so far) of an instance's requests,
    for the migration estimate.
    """

    def __init__(
        self,
        config: ClusterConfig,
        bandwidths: dict[str, float],
        tokens_of: Callable[[SimInstance, float], tuple[int, int]],
    ) -> None:
        self.config = config
        self.bandwidths = bandwidths
        self.tokens_of = tokens_of
        width = len(str(config.nodes - 1))
        self.nodes = {
            f"node-{i:0{width}d}": SimNode(f"node-{i:0{width}d}", config)
            for i in range(config.nodes)
        }
        self.views: dict[str, NodeView] = {}
        self.holders: dict[str, set[str]] = {}
        self.room = RoomIndex()
        self.dirty: set[str] = set(self.nodes)

    def cache_changed(self, node: SimNode, checkpoint: str) -> None:
        if node.holds(checkpoint):
            self.holders.setdefault(checkpoint, set()).add(node.node_id)
        else:
            held = self.holders.get(checkpoint)
            if held is not None:
                held.discard(node.node_id)
                if not held:
                    del self.holders[checkpoint]

    def snapshot(
        self, now: float, checkpoint: str, fits: dict[str, MigrationFit], default: MigrationFit
    ) -> ClusterSnapshot:
        """Refresh what may have changed, then wrap the live indexes (``place`` only reads)."""
        stale = self.dirty
        for node_id in self.holders.get(checkpoint, ()):
            if node_id not in self.room:
                stale.add(node_id)  # tokens of possible migration victims grow with time
        for node_id in sorted(stale):  # sorted: the order nodes rejoin ``room`` is seeded
            self._refresh(self.nodes[node_id], now)
        self.dirty = set()
        return ClusterSnapshot(
            nodes=self.views,
            holders=self.holders,
            free=self.room,
            migration=fits,
            default_migration=default,
            store_bw_max=self.bandwidths["store"],
            now=now,
            dram_bw_max=self.bandwidths["dram"],
        )

    def _refresh(self, node: SimNode, now: float) -> None:
        reclaim = self.config.reclaim_idle
        running: list[RunningInstance] = []
        idle: list[tuple[float, RunningInstance]] = []
        for inst in node.instances.values():
            if inst.state in ("waiting", "loading"):
                continue
            tin, tout = self.tokens_of(inst, now) if inst.active else (0, 0)
            is_idle = reclaim and inst.state == "ready" and not inst.active
            view = RunningInstance(
                instance_id=inst.instance_id,
                function=str(inst.function),
                checkpoint=inst.checkpoint,
                checkpoint_bytes=inst.nbytes,
                devices=inst.devices,
                tokens_in=tin,
                tokens_out=tout,
                in_flight=len(inst.active),
                idle=is_idle,
                migratable=inst.state == "ready" and bool(inst.active),
            )
            if is_idle:
                idle.append((inst.idle_since, view))
            else:
                running.append(view)
        idle.sort(key=lambda p: p[0])  # the longest idle is stopped first
        ordered = tuple(v for _, v in idle) + tuple(running)
        free = tuple(node.free)
        self.views[node.node_id] = NodeView(
            node_id=node.node_id,
            free_devices=free,
            busy_devices=tuple(d for d in node.devices if d not in free),
            cache={"dram": node.dram.entries, "ssd": node.ssd.entries},
            bandwidths=self.bandwidths,
            instances=ordered,
            queue_until=node.current_end + node.queued_s if node.current is not None else 0.0,
        )
        if free or idle:
            self.room.put(node.node_id, node.current is not None)
        else:
            self.room.discard(node.node_id)
