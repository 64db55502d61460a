"""The wire contract between gateway and nodes: versioned, typed msgpack messages.

Every payload is a msgpack map ``{"v": VERSION, "type": <name>, "body": {...}}``. ``decode``
checks the version, the type and every field's type, and refuses fields it does not know
(naming them); anything else raises ``ProtocolError`` (handlers reply with an error, never
crash). ``from_dict`` applies the same checks to a message that crosses another boundary
(the node's JSON lines to an instance process, ``runtime.instance.load_spec``).

Subjects (DESIGN.md, "Wire contract"). Everything a node publishes is under its own
``sllm.node.<node>.``, so NATS permissions can keep a node to its own subjects
(``sllm.nats_auth``), and the gateway drops a message whose body names another node:
- ``sllm.node.<node>.cmd``: request-reply; LoadCmd, UnloadCmd, DrainCmd, MigrateCmd -> CmdReply
- ``sllm.node.<node>.heartbeat``: NodeHeartbeat
- ``sllm.node.<node>.event``: InstanceEvent
- ``sllm.node.<node>.logs.<function>``: LogLine
- ``sllm.migration.<id>.*``: migration progress
- ``sllm.gateway.load``: GatewayLoad (each gateway's in-flight counts, for the leader)
- ``sllm.gateway.scale``: ScaleRequest -> CmdReply (a manual scale, to the leader)
- KV bucket ``sllm-lease``, key ``leader``: LeaseRecord (gateway.lease)
- KV bucket ``sllm-scale``: ScaleRecord, StartRecord (gateway.scale_state)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import msgpack

from sllm.errors import ProtocolError

# The gateways' own messages (issue 16) live in their own module; they are part of the contract
# and registered below like the rest.
from sllm.peer_messages import FunctionLoad as FunctionLoad
from sllm.peer_messages import GatewayLoad as GatewayLoad
from sllm.peer_messages import LeaseRecord as LeaseRecord
from sllm.peer_messages import ScaleRecord as ScaleRecord
from sllm.peer_messages import ScaleRequest as ScaleRequest
from sllm.peer_messages import StartRecord as StartRecord

VERSION = 1

# What the gateway subscribes to (every node's); nodes publish on the subjects below.
HEARTBEATS = "sllm.node.*.heartbeat"
EVENTS = "sllm.node.*.event"
LOGS = "sllm.node.*.logs.*"
# Gateways publish their in-flight counts here, for the leader (gateway.load_reports)
GATEWAY_LOAD_SUBJECT = "sllm.gateway.load"
# A gateway that does not lead hands a manual scale to the one that does (gateway.peers)
GATEWAY_SCALE_SUBJECT = "sllm.gateway.scale"


def node_cmd_subject(node_id: str) -> str:
    """The subject a node takes its commands on."""
    return f"sllm.node.{node_id}.cmd"


def heartbeat_subject(node_id: str) -> str:
    """The subject a node publishes its heartbeats on."""
    return f"sllm.node.{node_id}.heartbeat"


def event_subject(node_id: str) -> str:
    """The subject a node publishes its instances' events on."""
    return f"sllm.node.{node_id}.event"


def node_of(subject: str) -> str:
    """The node a ``sllm.node.<node>.…`` subject belongs to ("" for any other subject)."""
    parts = subject.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["sllm", "node"] else ""


def migration_subject(migration_id: str, what: str) -> str:
    """The subject of one migration's ``what`` (progress, done)."""
    return f"sllm.migration.{migration_id}.{what}"


def log_subject(node_id: str, function: str) -> str:
    """The subject a node publishes a function's log lines on."""
    return f"sllm.node.{node_id}.logs.{function}"


Tier = Literal["device", "dram", "ssd", "store"]
# What an instance event says happened (InstanceEvent.kind).
EventKind = Literal["ready", "failed", "stopped"]
# An instance's state in a heartbeat (InstanceState.state): the node's own states, plus
# "starting" (a load the node has accepted but not yet begun).
InstanceStatus = Literal["starting", "loading", "ready", "draining", "stopped", "failed"]
TIERS: tuple[Tier, ...] = ("device", "dram", "ssd", "store")


@dataclass(frozen=True)
class LoadCmd:
    """Start an instance of a function on ``device`` (idempotent by ``instance_id``).

    ``record`` is ``FunctionRecord.to_dict()``: spec, checkpoint key and size, revision.
    """

    instance_id: str
    function: str
    record: dict[str, Any]
    device: str


@dataclass(frozen=True)
class UnloadCmd:
    """Stop taking requests, let in-flight ones finish for up to ``drain_s``, then stop."""

    instance_id: str
    drain_s: float = 30.0


@dataclass(frozen=True)
class DrainCmd:
    """Drain every instance of the node (node shutdown)."""

    drain_s: float = 30.0


@dataclass(frozen=True)
class MigrateCmd:
    """Move the in-flight requests of ``instance_id`` to ``target_instance_id`` at
    ``target_address`` (an instance of the same function already loaded on the target node)."""

    instance_id: str
    migration_id: str
    target_node: str
    target_instance_id: str
    target_address: str
    max_rounds: int = 3
    threshold_tokens: int = 8
    # the target instance's secret (sllm.instance_auth): the source node calls it
    target_secret: str = field(default="", repr=False)


@dataclass(frozen=True)
class PrepareCmd:
    """A function was deployed or updated: a node that runs instances in containers builds its
    image now (cached by content), so its first cold start does not wait for the build.
    Published to each node's command subject without a reply (a node may receive nothing
    else, sllm.nats_auth)."""

    function: str
    record: dict[str, Any]


@dataclass(frozen=True)
class CmdReply:
    """A node's answer to a command: ``ok``, or a stable ``code`` and a message."""

    ok: bool
    code: str = ""
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceState:
    """One accelerator (or CPU slot) of a node and the instance holding it, if any."""

    device: str
    kind: str
    memory_bytes: int
    instance_id: str | None = None


@dataclass(frozen=True)
class InstanceState:
    """``secret``: what callers of the instance must send (sllm.instance_auth); heartbeats
    carry it so a restarted gateway can call the instances it adopts."""

    instance_id: str
    function: str
    device: str
    state: InstanceStatus
    address: str | None
    in_flight: int
    tokens_in: int = 0
    tokens_out: int = 0
    revision: int = 1
    secret: str = field(default="", repr=False)
    backend: str = ""  # "vllm" | "transformers" once chosen
    backend_reason: str = ""


@dataclass(frozen=True)
class CacheEntryState:
    """A checkpoint held in a node's cache tier, its size and whether it is in use."""

    checkpoint: str
    nbytes: int
    in_use: bool = False


@dataclass(frozen=True)
class NodeHeartbeat:
    """Node state, published every few seconds. ``bandwidths`` are bytes/s per tier hop into
    the device (learned); ``load_queue_s`` is the estimated wait before a new load starts."""

    node_id: str
    seq: int
    devices: list[DeviceState]
    instances: list[InstanceState]
    cache: dict[str, list[CacheEntryState]]
    bandwidths: dict[str, float]
    load_queue_s: float = 0.0
    cache_capacity: dict[str, int] = field(default_factory=dict)
    # pre-started instance processes waiting for a model (a load on this node skips start-up)
    pool_idle: int = 0


@dataclass(frozen=True)
class InstanceEvent:
    """kind: ready | failed | stopped. On ready, ``address`` is http://host:port and ``secret``
    what its callers must send; ``tier`` says where the checkpoint came from and ``load_s`` how
    long command-to-ready took; ``backend`` is the inference engine the instance runs and
    ``backend_reason`` why it was chosen. On failed, ``code`` is the error's stable code
    (``cache_full``, ``checkpoint_invalid``, ...)."""

    kind: EventKind
    instance_id: str
    node_id: str
    function: str
    address: str | None = None
    error: str = ""
    tier: str = ""
    load_s: float = 0.0
    revision: int = 1
    secret: str = field(default="", repr=False)
    code: str = ""
    backend: str = ""
    backend_reason: str = ""


@dataclass(frozen=True)
class MigrationProgress:
    """One step of a live migration (phase, round, tokens), published by the source node."""

    migration_id: str
    phase: str
    round: int = 0
    tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class LogLine:
    """One line an instance wrote (stdout/stderr) or a lifecycle note, on
    ``sllm.node.<node>.logs.<function>``."""

    function: str
    instance_id: str
    node_id: str
    line: str
    stream: str = "stderr"


MESSAGE_TYPES: dict[str, type] = {
    "load": LoadCmd,
    "unload": UnloadCmd,
    "drain": DrainCmd,
    "migrate": MigrateCmd,
    "prepare": PrepareCmd,
    "reply": CmdReply,
    "heartbeat": NodeHeartbeat,
    "instance_event": InstanceEvent,
    "migration_progress": MigrationProgress,
    "log": LogLine,
    "gateway_load": GatewayLoad,
    "lease": LeaseRecord,
    "scale_request": ScaleRequest,
    "scale": ScaleRecord,
    "start": StartRecord,
}
_NAMES = {cls: name for name, cls in MESSAGE_TYPES.items()}

M = TypeVar("M")


def encode(message: object) -> bytes:
    """A message as its versioned msgpack payload."""
    name = _NAMES.get(type(message))
    if name is None:
        raise TypeError(f"not a wire message: {type(message).__name__}")
    body = dataclasses.asdict(message)  # type: ignore[call-overload]
    packed: bytes = msgpack.packb({"v": VERSION, "type": name, "body": body}, use_bin_type=True)
    return packed


def decode(payload: bytes) -> object:
    """Decode any known message; raises ProtocolError naming what was wrong."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"malformed msgpack payload: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("payload is not a map")
    version = raw.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported message version {version!r} (this side speaks {VERSION})")
    name = raw.get("type")
    cls = MESSAGE_TYPES.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(name, str):
        raise ProtocolError(f"unknown message type {name!r}")
    body = raw.get("body")
    if not isinstance(body, dict):
        raise ProtocolError(f"{name}: body is not a map")
    return _from_value(cls, body, name)


def decode_as(payload: bytes, cls: type[M]) -> M:
    """``decode``, checking the message is a ``cls``."""
    message = decode(payload)
    if not isinstance(message, cls):
        raise ProtocolError(
            f"expected {_NAMES.get(cls, cls.__name__)}, got {_NAMES[type(message)]}"
        )
    return message


def from_dict(cls: type[M], data: object, where: str) -> M:
    """``data`` (a decoded map) as the message ``cls``, checked as ``decode`` checks a wire
    message: every field's type, no missing field, no unknown one (``ProtocolError``)."""
    message: M = _from_value(cls, data, where)
    return message


def _from_value(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_value(arg, value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ProtocolError(f"{where}: {value!r} is not one of {get_args(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list")
        (item,) = get_args(tp)
        return [_from_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        key_t, val_t = get_args(tp)
        return {
            _from_value(key_t, k, f"{where}.key"): _from_value(val_t, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ProtocolError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _from_value(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where}: missing field {f.name!r}")
        return tp(**kwargs)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
    if tp in (str, bool, bytes):
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise ProtocolError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    raise ProtocolError(f"{where}: unsupported field type {tp!r}")
