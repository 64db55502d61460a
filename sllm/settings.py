"""Every setting of the platform, parsed once at start, validated and frozen (STYLE.md 8).

This module is the one place that lists environment variables. Each component's settings
class has ``from_env(env)``; CLI flags override by ``dataclasses.replace``. An invalid value
raises ``ValidationFailed`` naming the variable, the value and the allowed range.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sllm.errors import ValidationFailed
from sllm.spec import parse_duration, parse_memory

T = TypeVar("T")

# The placement policies (gateway/scheduler/policies.py implements them), listed once here so
# SLLM_POLICY, `--policy` and the simulator accept the same names.
DEFAULT_POLICY = "locality+migration"
POLICIES: tuple[str, ...] = (
    "random",
    "least-loaded",
    "locality",
    "locality+migration",
    "download-every-time",
)

# name -> (default, description). `sllm env` prints this table.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "SLLM_HOME": ("~/.local/share/sllm", "data directory of `sllm up` (NATS, store, caches)"),
    "SLLM_NATS_URL": (
        "nats://127.0.0.1:4222",
        "NATS server URLs, comma-separated (for a cluster, several of its servers: a client "
        "reconnects across them)",
    ),
    "SLLM_NATS_REPLICAS": ("1", "JetStream replicas of the gateway's KV buckets (3 on 3 servers)"),
    "SLLM_NATS_SEED_FILE": ("", "NKey seed file (sllm nats creds) of this process; empty: none"),
    "SLLM_STORE_URL": ("", "model store: a local directory or s3://bucket/prefix"),
    "SLLM_S3_ENDPOINT": ("", "S3 endpoint URL (empty: AWS); also AWS_ENDPOINT_URL"),
    "SLLM_S3_REGION": ("us-east-1", "S3 region; also AWS_REGION / AWS_DEFAULT_REGION"),
    "SLLM_S3_PATH_STYLE": ("true", "path-style S3 addressing (true for MinIO, SeaweedFS)"),
    "SLLM_S3_CONCURRENCY": ("8", "parallel ranged GETs / multipart uploads"),
    "SLLM_S3_PART_SIZE": ("16Mi", "bytes per ranged GET and per multipart upload part"),
    "SLLM_S3_RETRIES": ("4", "attempts per store request before a clear error"),
    "SLLM_S3_ACCESS_KEY_ID": ("", "S3 access key (empty: AWS_ACCESS_KEY_ID, the AWS chain)"),
    "SLLM_S3_SECRET_ACCESS_KEY": ("", "S3 secret key (empty: AWS_SECRET_ACCESS_KEY)"),
    "SLLM_NODE_ID": ("node-0", "this node's id (DNS-1123 label)"),
    "SLLM_NODE_HOST": ("127.0.0.1", "address instances listen on"),
    "SLLM_CACHE_DIR": ("", "node-local SSD cache directory (default: $SLLM_HOME/cache/<node>)"),
    "SLLM_SSD_CAPACITY": ("20Gi", "SSD cache capacity in bytes"),
    "SLLM_DRAM_CAPACITY": ("8Gi", "DRAM cache capacity in bytes"),
    "SLLM_DRAM_DIR": (
        "/dev/shm",
        "tmpfs directory the node's DRAM tier lives in; one mounted with huge=within_size "
        "gives the images 2 MiB pages (docs/tiers.md)",
    ),
    "SLLM_DRAM_PREALLOCATE": (
        "0",
        "bytes of DRAM cache the node allocates, maps and writes once at start, so its first "
        "loads pay for no fresh shared memory (e.g. the largest checkpoint; 0: none)",
    ),
    "SLLM_CPU_SLOTS": ("2", "instances a node without CUDA runs at once"),
    "SLLM_POOL_SIZE": ("1", "pre-started instance processes waiting for a model (per image)"),
    "SLLM_POOL_REFILL_AFTER": (
        "5s",
        "after a load, the pool is refilled once the new instance answered its first request, "
        "or this long after it became ready if no request came",
    ),
    "SLLM_INSTANCES": (
        "process",
        "how a node runs instances: process (children of the node), container (one podman "
        "container each; root), auto (container when podman is usable; `sllm up`'s default)",
    ),
    "SLLM_INSTANCE_IMAGE": (
        "",
        "runtime image of container instances (empty: build this checkout's, cached by digest)",
    ),
    "SLLM_VLLM": ("auto", "the vLLM backend: auto (when vllm is installed), on (required), off"),
    "SLLM_VLLM_POOL_SIZE": (
        "1",
        "pre-started vLLM instance processes (vllm imported); each keeps the warm engine of "
        "one of the models loaded last",
    ),
    "SLLM_VLLM_SPARE": (
        "1",
        "pre-started vLLM processes kept without an engine besides those: a model no idle "
        "process holds builds at once, without freeing another model's engine first",
    ),
    "SLLM_HEARTBEAT_INTERVAL": ("2s", "node heartbeat period"),
    "SLLM_STORE_BANDWIDTH": (
        "",
        "node's store bandwidth in bytes/s until it measures a pull, e.g. 125M for 1 Gbit/s "
        "(empty: 200M)",
    ),
    "SLLM_GATEWAY_HOST": ("127.0.0.1", "gateway bind address"),
    "SLLM_GATEWAY_PORT": ("8080", "gateway port"),
    "SLLM_TOKEN": ("", "bearer token for /system (required by the gateway)"),
    "SLLM_MAX_BODY_BYTES": ("1Mi", "largest request body the gateway accepts"),
    "SLLM_QUEUE_SIZE": ("64", "cold-start queue capacity per function"),
    "SLLM_WAKE_TIMEOUT": ("300s", "how long a cold start may take before queued requests get 503"),
    "SLLM_REQUEST_TIMEOUT": ("600s", "upper bound on one proxied request"),
    "SLLM_GATEWAY_ID": (
        "",
        "this gateway's name among several (the lease holder, its load reports); empty: "
        "<host name>-<pid>",
    ),
    "SLLM_SHUTDOWN_GRACE": (
        "20s",
        "on SIGTERM the gateway stops accepting connections and lets requests in flight finish; "
        "streams still running after this long end with a gateway_stopping error event",
    ),
    "SLLM_POLICY": (DEFAULT_POLICY, "placement policy"),
    "SLLM_SCALE_DOWN_WINDOW": ("30s", "how long load must stay lower before scaling down"),
    "SLLM_NODE_TIMEOUT": (
        "10s",
        "heartbeat silence after which the gateway stops placing on a node and asks its "
        "instances directly whether they still serve",
    ),
    "SLLM_GATEWAY_URL": ("http://127.0.0.1:8080", "gateway URL the CLI talks to"),
    "SLLM_KEY": ("", "invocation key the CLI sends to private functions (default: the token)"),
}


def _get(env: Mapping[str, str], key: str) -> str:
    value = env.get(key)
    return value if value else ENVIRONMENT[key][0]


def _parse(env: Mapping[str, str], key: str, conv: Callable[[str], T]) -> T:
    raw = _get(env, key)
    try:
        return conv(raw)
    except ValidationFailed as exc:
        raise ValidationFailed(f"{key}={raw!r}: {exc.message}") from None
    except ValueError as exc:
        raise ValidationFailed(f"{key}={raw!r}: {exc}") from None


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """A parser of integers in ``[lo, hi]``."""

    def conv(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be an integer in [{lo}, {hi}]")
        return value

    return conv


def as_bool(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` as a bool."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def as_bytes(raw: str) -> int:
    """A memory size (``512Mi``, ``2G``, bytes) as bytes."""
    return parse_memory(raw, "value")


def _optional_bytes(raw: str) -> int:
    return as_bytes(raw) if raw else 0


def as_seconds(raw: str) -> float:
    """A duration (``30s``, ``5m``, seconds) as seconds."""
    return parse_duration(raw, "value")


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def as_nats_urls(raw: str) -> tuple[str, ...]:
    """``nats://host:port[,nats://host:port...]`` -> the URLs, each checked (scheme, host,
    port), in order: nats-py tries them in turn and reconnects across them."""
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not urls:
        raise ValueError("must name at least one NATS server, e.g. nats://127.0.0.1:4222")
    for url in urls:
        parsed = urlsplit(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme not in NATS_SCHEMES or not parsed.hostname or port is None:
            raise ValueError(
                f"{url!r} is not a NATS server URL: want scheme://host:port with scheme one of "
                f"{', '.join(NATS_SCHEMES)}"
            )
    return urls


_GATEWAY_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def as_gateway_id(raw: str) -> str:
    """A name among gateways: 1-128 of letters, digits, '.', '_', '-'; empty: host-pid."""
    if not raw:
        return f"{socket.gethostname()}-{os.getpid()}"[:128]
    if not _GATEWAY_ID.fullmatch(raw):
        raise ValueError("want 1-128 letters, digits, '.', '_' or '-'")
    return raw


def home(env: Mapping[str, str] | None = None) -> Path:
    """The data directory (``SLLM_HOME``, else ~/.local/share/sllm)."""
    env = os.environ if env is None else env
    return Path(os.path.expanduser(_get(env, "SLLM_HOME")))


@dataclass(frozen=True)
class StoreSettings:
    """Where checkpoints are stored (a directory or an S3 bucket) and how to reach it."""

    url: str
    s3_endpoint: str | None
    s3_region: str
    s3_path_style: bool
    concurrency: int
    part_size: int
    retries: int
    # Explicit S3 credentials; None: boto3's chain (AWS_* variables, profiles, instance role).
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> StoreSettings:
        """The store settings from the environment, validated."""
        env = os.environ if env is None else env
        url = _get(env, "SLLM_STORE_URL") or str(home(env) / "store")
        endpoint = env.get("SLLM_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None
        region = (
            env.get("SLLM_S3_REGION")
            or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or ENVIRONMENT["SLLM_S3_REGION"][0]
        )
        return StoreSettings(
            url=url,
            s3_endpoint=endpoint,
            s3_region=region,
            s3_path_style=_parse(env, "SLLM_S3_PATH_STYLE", as_bool),
            concurrency=_parse(env, "SLLM_S3_CONCURRENCY", int_in(1, 64)),
            part_size=_parse(env, "SLLM_S3_PART_SIZE", as_bytes),
            retries=_parse(env, "SLLM_S3_RETRIES", int_in(1, 20)),
            access_key_id=env.get("SLLM_S3_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("SLLM_S3_SECRET_ACCESS_KEY") or None,
        )


INSTANCE_MODES = ("process", "container", "auto")


@dataclass(frozen=True)
class NodeSettings:
    """A node's settings (identity, devices, caches, store, NATS), parsed once at start."""

    node_id: str
    nats_urls: tuple[str, ...]
    host: str
    cache_dir: Path
    ssd_capacity: int
    dram_capacity: int
    cpu_slots: int
    pool_size: int
    heartbeat_s: float
    store: StoreSettings
    # Store bandwidth (bytes/s) reported before the node has measured a pull; 0: the default
    # seed. The start-up probe measures SSD and DRAM only (reading the store costs money and
    # needs a key), so an operator who knows the link says it here.
    store_bandwidth: float = 0.0
    nats_seed_file: str = ""
    instances: str = "process"  # process | container | auto
    instance_image: str = ""
    vllm: str = "auto"  # auto | on | off
    vllm_pool_size: int = 1
    vllm_spare: int = 1
    # bytes of DRAM slab made at start (``DramCache.preallocate``); at most the capacity
    dram_preallocate: int = 0
    # the tmpfs the DRAM tier's directory is made in (runtime.node.main.dram_root)
    dram_dir: Path = Path("/dev/shm")
    # the longest a pool refill waits for a new instance's first answer (Supervisor._follow)
    pool_refill_after_s: float = 5.0

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> NodeSettings:
        """The node's settings from the environment, validated."""
        from sllm.spec import validate_name

        env = os.environ if env is None else env
        node_id = _get(env, "SLLM_NODE_ID")
        try:
            validate_name(node_id, "SLLM_NODE_ID")
        except ValidationFailed as exc:
            raise ValidationFailed(f"SLLM_NODE_ID={node_id!r}: {exc.message}") from None
        cache_dir = _get(env, "SLLM_CACHE_DIR")
        dram_capacity = _parse(env, "SLLM_DRAM_CAPACITY", as_bytes)
        preallocate = _parse(env, "SLLM_DRAM_PREALLOCATE", as_bytes)
        if preallocate > dram_capacity:
            raise ValidationFailed(
                f"SLLM_DRAM_PREALLOCATE={_get(env, 'SLLM_DRAM_PREALLOCATE')!r}: must be at most "
                f"SLLM_DRAM_CAPACITY ({dram_capacity} bytes)"
            )
        dram_dir = _get(env, "SLLM_DRAM_DIR")
        if not os.path.isabs(dram_dir):
            raise ValidationFailed(f"SLLM_DRAM_DIR={dram_dir!r}: must be an absolute path")
        instances = _get(env, "SLLM_INSTANCES")
        if instances not in INSTANCE_MODES:
            raise ValidationFailed(
                f"SLLM_INSTANCES={instances!r}: must be one of {', '.join(INSTANCE_MODES)}"
            )
        vllm = _get(env, "SLLM_VLLM")
        if vllm not in ("auto", "on", "off"):
            raise ValidationFailed(f"SLLM_VLLM={vllm!r}: must be one of auto, on, off")
        return NodeSettings(
            node_id=node_id,
            nats_urls=_parse(env, "SLLM_NATS_URL", as_nats_urls),
            host=_get(env, "SLLM_NODE_HOST"),
            cache_dir=Path(cache_dir) if cache_dir else home(env) / "cache" / node_id,
            ssd_capacity=_parse(env, "SLLM_SSD_CAPACITY", as_bytes),
            dram_capacity=dram_capacity,
            cpu_slots=_parse(env, "SLLM_CPU_SLOTS", int_in(0, 256)),
            pool_size=_parse(env, "SLLM_POOL_SIZE", int_in(0, 64)),
            heartbeat_s=_parse(env, "SLLM_HEARTBEAT_INTERVAL", as_seconds),
            store=StoreSettings.from_env(env),
            store_bandwidth=float(_parse(env, "SLLM_STORE_BANDWIDTH", _optional_bytes)),
            nats_seed_file=_get(env, "SLLM_NATS_SEED_FILE"),
            instances=instances,
            instance_image=_get(env, "SLLM_INSTANCE_IMAGE"),
            vllm=vllm,
            vllm_pool_size=_parse(env, "SLLM_VLLM_POOL_SIZE", int_in(0, 64)),
            vllm_spare=_parse(env, "SLLM_VLLM_SPARE", int_in(0, 8)),
            dram_preallocate=preallocate,
            dram_dir=Path(dram_dir),
            pool_refill_after_s=_parse(env, "SLLM_POOL_REFILL_AFTER", as_seconds),
        )


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's settings (listen address, limits, policy, NATS), parsed once at start."""

    nats_urls: tuple[str, ...]
    host: str
    port: int
    token: str
    max_body_bytes: int
    queue_size: int
    wake_timeout_s: float
    request_timeout_s: float
    policy: str
    store: StoreSettings
    stable_window_s: float = 30.0
    nats_seed_file: str = ""
    node_timeout_s: float = 10.0
    nats_replicas: int = 1
    shutdown_grace_s: float = 20.0
    gateway_id: str = "gateway"

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> GatewaySettings:
        """The gateway's settings from the environment, validated."""
        env = os.environ if env is None else env
        policy = _get(env, "SLLM_POLICY")
        if policy not in POLICIES:
            raise ValidationFailed(f"SLLM_POLICY={policy!r}: must be one of {', '.join(POLICIES)}")
        return GatewaySettings(
            nats_urls=_parse(env, "SLLM_NATS_URL", as_nats_urls),
            host=_get(env, "SLLM_GATEWAY_HOST"),
            port=_parse(env, "SLLM_GATEWAY_PORT", int_in(1, 65535)),
            token=env.get("SLLM_TOKEN", ""),
            max_body_bytes=_parse(env, "SLLM_MAX_BODY_BYTES", as_bytes),
            queue_size=_parse(env, "SLLM_QUEUE_SIZE", int_in(1, 100_000)),
            wake_timeout_s=_parse(env, "SLLM_WAKE_TIMEOUT", as_seconds),
            request_timeout_s=_parse(env, "SLLM_REQUEST_TIMEOUT", as_seconds),
            policy=policy,
            store=StoreSettings.from_env(env),
            stable_window_s=_parse(env, "SLLM_SCALE_DOWN_WINDOW", as_seconds),
            nats_seed_file=_get(env, "SLLM_NATS_SEED_FILE"),
            node_timeout_s=_parse(env, "SLLM_NODE_TIMEOUT", as_seconds),
            # 5: the most replicas JetStream keeps of a stream
            nats_replicas=_parse(env, "SLLM_NATS_REPLICAS", int_in(1, 5)),
            shutdown_grace_s=_parse(env, "SLLM_SHUTDOWN_GRACE", as_seconds),
            gateway_id=_parse(env, "SLLM_GATEWAY_ID", as_gateway_id),
        )
