"""`sllm node start`: run the runtime node agent (settings from the environment, flags win)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from sllm.errors import InvalidInput, ValidationFailed
from sllm.settings import NodeSettings

Groups = dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    from sllm_cli.app import group

    node = group(root, groups, "node", "run a runtime node (instances on this machine's devices)")
    p = node.add_parser(
        "start",
        help="run the node agent until Ctrl-C or SIGTERM",
        description="Connect to NATS, publish heartbeats and start/stop function instances on "
        "command. Every flag defaults to its SLLM_* environment variable (`sllm env`).",
    )
    p.add_argument("--node-id", help="this node's id (SLLM_NODE_ID)")
    p.add_argument("--nats-url", help="NATS server URLs, comma-separated (SLLM_NATS_URL)")
    p.add_argument("--nats-seed-file", help="NKey seed file (SLLM_NATS_SEED_FILE)")
    p.add_argument("--store-url", help="model store: directory or s3://bucket/prefix")
    p.add_argument("--host", help="address instances listen on (SLLM_NODE_HOST)")
    p.add_argument("--cache-dir", type=Path, help="SSD cache directory (SLLM_CACHE_DIR)")
    p.add_argument("--ssd-capacity", help="SSD cache capacity, e.g. 20Gi")
    p.add_argument("--dram-capacity", help="DRAM cache capacity, e.g. 8Gi")
    p.add_argument(
        "--dram-preallocate", help="DRAM slab made at start, e.g. 2Gi (SLLM_DRAM_PREALLOCATE)"
    )
    p.add_argument("--dram-dir", help="tmpfs directory of the DRAM tier (SLLM_DRAM_DIR, /dev/shm)")
    p.add_argument("--cpu-slots", type=int, help="instances at once without CUDA")
    p.add_argument("--pool-size", type=int, help="pre-started instance processes")
    p.add_argument(
        "--pool-refill-after",
        help="refill the pool this long after a load when its first request has not been "
        "answered yet (SLLM_POOL_REFILL_AFTER, 5s)",
    )
    p.add_argument(
        "--vllm", choices=("auto", "on", "off"), help="the vLLM backend on this node (SLLM_VLLM)"
    )
    p.add_argument("--vllm-pool-size", type=int, help="pre-started vLLM instance processes")
    p.add_argument(
        "--vllm-spare", type=int, help="vLLM processes kept without an engine (SLLM_VLLM_SPARE)"
    )
    p.add_argument("--heartbeat", help="heartbeat period, e.g. 2s")
    p.add_argument(
        "--instances",
        choices=("process", "container", "auto"),
        help="instances as child processes or one container each (SLLM_INSTANCES)",
    )
    p.add_argument("--instance-image", help="runtime image of containers (SLLM_INSTANCE_IMAGE)")
    p.add_argument(
        "--store-bandwidth",
        help="store link bytes/s reported until a pull is measured, e.g. 125M",
    )
    p.add_argument(
        "--drain", default="30s", help="how long instances may finish requests on shutdown"
    )
    p.set_defaults(func=cmd_start)


def _settings(args: argparse.Namespace) -> NodeSettings:
    env = dict(os.environ)
    flags = {
        "SLLM_NODE_ID": args.node_id,
        "SLLM_NATS_URL": args.nats_url,
        "SLLM_NATS_SEED_FILE": args.nats_seed_file,
        "SLLM_STORE_URL": args.store_url,
        "SLLM_NODE_HOST": args.host,
        "SLLM_CACHE_DIR": str(args.cache_dir) if args.cache_dir else None,
        "SLLM_SSD_CAPACITY": args.ssd_capacity,
        "SLLM_DRAM_CAPACITY": args.dram_capacity,
        "SLLM_DRAM_PREALLOCATE": args.dram_preallocate,
        "SLLM_DRAM_DIR": args.dram_dir,
        "SLLM_CPU_SLOTS": None if args.cpu_slots is None else str(args.cpu_slots),
        "SLLM_POOL_SIZE": None if args.pool_size is None else str(args.pool_size),
        "SLLM_POOL_REFILL_AFTER": args.pool_refill_after,
        "SLLM_VLLM": args.vllm,
        "SLLM_VLLM_POOL_SIZE": None if args.vllm_pool_size is None else str(args.vllm_pool_size),
        "SLLM_VLLM_SPARE": None if args.vllm_spare is None else str(args.vllm_spare),
        "SLLM_HEARTBEAT_INTERVAL": args.heartbeat,
        "SLLM_STORE_BANDWIDTH": args.store_bandwidth,
        "SLLM_INSTANCES": args.instances,
        "SLLM_INSTANCE_IMAGE": args.instance_image,
    }
    env.update({k: v for k, v in flags.items() if v is not None})
    settings = NodeSettings.from_env(env)
    if settings.heartbeat_s <= 0:
        raise ValidationFailed("SLLM_HEARTBEAT_INTERVAL: must be greater than 0")
    return settings


def cmd_start(args: argparse.Namespace) -> int:
    import asyncio

    from runtime.node.main import run_node
    from sllm.spec import parse_duration

    try:
        drain_s = parse_duration(args.drain, "--drain")
    except ValidationFailed as exc:
        raise InvalidInput(exc.message) from None
    settings = _settings(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_node(settings, stop, drain_s)

    asyncio.run(main())
    return 0
