"""Build a ClusterSnapshot from the nodes' latest heartbeats (pure: data in, data out)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from gateway.scheduler.types import ClusterSnapshot, MigrationFit, NodeView, RunningInstance
from sllm.messages import NodeHeartbeat

# Instance states whose requests can be moved by a token-based migration.
_MIGRATABLE_STATES = frozenset({"ready"})


def snapshot_from_heartbeats(
    heartbeats: Mapping[str, NodeHeartbeat],
    reserved: Mapping[str, Collection[str]] | None = None,
    *,
    functions: Mapping[str, tuple[str, int]] | None = None,
    bandwidths: Mapping[str, Mapping[str, float]] | None = None,
    migration: Mapping[str, MigrationFit] | None = None,
    reclaim_idle: bool = False,
) -> ClusterSnapshot:
    """The cluster as the scheduler sees it.

    ``heartbeats``: node id -> its latest heartbeat. ``reserved``: node id -> devices already
    booked by loads sent but not yet visible in a heartbeat; they are never offered again, so
    one accelerator is never booked twice. ``functions``: function name -> (checkpoint key,
    bytes) from the registry, so running instances can be weighed as migration victims (an
    instance of an unknown function is never migrated). ``bandwidths``: node id -> {tier:
    bytes/s} learned by the gateway (estimators.BandwidthModel.table()); they override what the
    node reported. ``migration``: checkpoint key -> fitted resume model. ``reclaim_idle``: an
    instance with nothing in flight may be stopped to free its device (keep-alive is then a
    preference, not a reservation).
    """
    reserved = reserved or {}
    functions = functions or {}
    bandwidths = bandwidths or {}
    nodes: list[NodeView] = []
    for node_id, hb in heartbeats.items():
        booked = set(reserved.get(node_id, ()))
        free = tuple(
            d.device for d in hb.devices if d.instance_id is None and d.device not in booked
        )
        busy = tuple(d.device for d in hb.devices if d.device not in free)
        devices_of: dict[str, list[str]] = {}
        for d in hb.devices:
            if d.instance_id is not None:
                devices_of.setdefault(d.instance_id, []).append(d.device)
        instances: list[RunningInstance] = []
        for inst in hb.instances:
            if inst.state in ("stopped", "failed"):
                continue
            known = functions.get(inst.function)
            devices = tuple(devices_of.get(inst.instance_id, [inst.device]))
            if any(dev in booked for dev in devices):
                continue  # a pending command already owns this device (e.g. an eviction)
            instances.append(
                RunningInstance(
                    instance_id=inst.instance_id,
                    function=inst.function,
                    checkpoint=known[0] if known else "",
                    checkpoint_bytes=known[1] if known else 0,
                    devices=devices,
                    tokens_in=inst.tokens_in,
                    tokens_out=inst.tokens_out,
                    in_flight=inst.in_flight,
                    idle=reclaim_idle and inst.state == "ready" and inst.in_flight == 0,
                    migratable=known is not None and inst.state in _MIGRATABLE_STATES,
                )
            )
        cache = {
            tier: {e.checkpoint: e.nbytes for e in hb.cache.get(tier, [])}
            for tier in ("dram", "ssd")
        }
        bw = {k: v for k, v in hb.bandwidths.items() if v > 0}
        bw.update({k: v for k, v in bandwidths.get(node_id, {}).items() if v > 0})
        nodes.append(
            NodeView(
                node_id=node_id,
                free_devices=free,
                busy_devices=busy,
                cache=cache,
                bandwidths=bw,
                load_queue_s=max(0.0, hb.load_queue_s),
                instances=tuple(instances),
            )
        )
    return ClusterSnapshot.build(nodes, migration=migration)
