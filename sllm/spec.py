"""The function spec (``function.yaml``) and the registry record built from it.

Parsing is strict: an unknown key, a wrong type or an out-of-range value raises
``ValidationFailed`` whose message names the dotted key and, for YAML input, its line.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import yaml

from sllm.errors import ValidationFailed

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HANDLER_RE = re.compile(r"^(chat|completion|embedding|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_MEMORY_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
BACKENDS = ("auto", "vllm", "transformers")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Who may invoke a function: anyone (public) or callers with an invocation key (private).
AUTH_MODES = ("public", "private")


def validate_name(name: object, key: str = "name") -> str:
    """A DNS-1123 label: lower-case letters, digits and '-', 1-63 characters."""
    if not isinstance(name, str) or not name:
        raise ValidationFailed(f"{key}: must be a non-empty string")
    if len(name) > 63 or not NAME_RE.match(name):
        raise ValidationFailed(
            f"{key}: {name!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return name


def checkpoint_key_problem(key: str) -> str | None:
    """Why ``key`` cannot name an object prefix in a store (None when it can): it must be a
    relative '/'-separated name without empty, '.' or '..' segments, backslashes or NUL, so
    that no node can be sent outside its store's root."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return "must be a relative '/'-separated name"
    if any(s in ("", ".", "..") for s in key.split("/")):
        return "must not have empty, '.' or '..' segments"
    return None


def parse_memory(value: object, key: str) -> int:
    """'2Gi', '512Mi', '1G' or a plain number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValidationFailed(f"{key}: expected a size such as 2Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValidationFailed(f"{key}: must be >= 0, got {value}")
        return value
    m = _MEMORY_RE.match(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise ValidationFailed(f"{key}: expected a size such as 2Gi or 512Mi, got {value!r}")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2)])


def parse_duration(value: object, key: str) -> float:
    """'60s', '5m', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValidationFailed(f"{key}: expected a duration such as 60s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value).strip()) if isinstance(value, str) else None
        if not m:
            raise ValidationFailed(f"{key}: expected a duration such as 60s or 5m, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds < 0:
        raise ValidationFailed(f"{key}: must be >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Resources:
    """What one instance needs: accelerators and memory (bytes)."""

    accelerators: int = 1
    memory_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class Scale:
    """Autoscaling bounds, the target requests per instance, and the idle keep-alive (s)."""

    min: int = 0
    max: int = 4
    target_concurrency: int = 4
    keep_alive_s: float = 60.0


@dataclass(frozen=True)
class Generation:
    """Default sampling settings of the function's requests."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0


@dataclass(frozen=True)
class FunctionSpec:
    """What a user deploys. ``model`` is a local path or a store URL (s3://bucket/prefix).
    ``auth``: "private" (the default, also for records stored before the field existed)
    wants an invocation key; "public" lets anyone who reaches the gateway invoke it.
    ``backend``: the instance's inference engine; ``auto`` picks vLLM where the node has it and
    it supports the model, else transformers."""

    name: str
    model: str
    handler: str = "chat"
    auth: str = "private"
    backend: str = "auto"
    resources: Resources = field(default_factory=Resources)
    scale: Scale = field(default_factory=Scale)
    generation: Generation = field(default_factory=Generation)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (for the record and the API)."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> FunctionSpec:
        """Inverse of ``to_dict`` (internal form with bytes and seconds); validates."""
        return _build(data, lines={}, internal=True)


@dataclass(frozen=True)
class FunctionRecord:
    """A deployed function as the registry keeps it.

    ``checkpoint`` is the key of the converted checkpoint in the platform's store (nodes pull it
    by that key); ``checkpoint_bytes`` its total size; ``revision`` increases on every update.
    ``requirements``: the function folder's requirements.txt (Python packages its handler
    imports); a node running instances in containers builds the function's image with them.
    """

    spec: FunctionSpec
    checkpoint: str
    checkpoint_bytes: int
    revision: int = 1
    handler_source: dict[str, str] = field(default_factory=dict)
    requirements: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as plain data (as stored in the KV bucket)."""
        return {
            "spec": self.spec.to_dict(),
            "checkpoint": self.checkpoint,
            "checkpoint_bytes": self.checkpoint_bytes,
            "revision": self.revision,
            "handler_source": dict(self.handler_source),
            "requirements": self.requirements,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> FunctionRecord:
        """A stored record back, validated (``ValidationFailed`` naming a missing key)."""
        if not isinstance(data, dict):
            raise ValidationFailed("record: expected a mapping")
        try:
            return FunctionRecord(
                spec=FunctionSpec.from_dict(data["spec"]),
                checkpoint=_checkpoint_key(_typed(data["checkpoint"], str, "checkpoint")),
                checkpoint_bytes=_typed(data["checkpoint_bytes"], int, "checkpoint_bytes"),
                revision=_typed(data.get("revision", 1), int, "revision"),
                handler_source={
                    _typed(k, str, "handler_source"): _typed(v, str, f"handler_source.{k}")
                    for k, v in dict(data.get("handler_source") or {}).items()
                },
                requirements=_typed(data.get("requirements", ""), str, "requirements"),
            )
        except KeyError as exc:
            raise ValidationFailed(f"record: missing key {exc.args[0]!r}") from None

    def bump(self, spec: FunctionSpec, checkpoint: str, checkpoint_bytes: int) -> FunctionRecord:
        """The next revision of this function with a new spec and checkpoint."""
        return replace(
            self,
            spec=spec,
            checkpoint=checkpoint,
            checkpoint_bytes=checkpoint_bytes,
            revision=self.revision + 1,
        )


def parse_spec_yaml(text: str, source: str = "function.yaml") -> FunctionSpec:
    """Parse and validate function.yaml text; errors name the key and its line."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"{source}: not valid YAML: {exc}") from None
    if node is None:
        raise ValidationFailed(f"{source}: empty file")
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValidationFailed(f"{source}: expected a mapping at the top level")
    try:
        return _build(data, lines=lines, internal=False)
    except ValidationFailed as exc:
        raise ValidationFailed(f"{source}: {exc.message}") from None


def parse_spec_dict(data: object) -> FunctionSpec:
    """Validate a spec given as JSON (user-facing form: '2Gi', '60s' accepted)."""
    if not isinstance(data, dict):
        raise ValidationFailed("spec: expected a JSON object")
    return _build(data, lines={}, internal=False)


def _collect_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key + ".", out)


def _where(key: str, lines: dict[str, int]) -> str:
    return f"{key} (line {lines[key]})" if key in lines else key


def _checkpoint_key(key: str) -> str:
    problem = checkpoint_key_problem(key)
    if problem is not None:
        raise ValidationFailed(f"checkpoint: {key!r} {problem}")
    return key


def _typed(value: object, kind: type, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ValidationFailed(f"{key}: expected {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        raise ValidationFailed(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _section(
    data: dict[str, Any], key: str, allowed: set[str], lines: dict[str, int]
) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationFailed(f"{_where(key, lines)}: expected a mapping")
    for sub in value:
        if sub not in allowed:
            full = f"{key}.{sub}"
            raise ValidationFailed(
                f"{_where(full, lines)}: unknown key (allowed: {', '.join(sorted(allowed))})"
            )
    return value


def _int_in(value: object, key: str, lo: int, hi: int, lines: dict[str, int]) -> int:
    try:
        number = _typed(value, int, key)
    except ValidationFailed as exc:
        raise ValidationFailed(exc.message.replace(key, _where(key, lines), 1)) from None
    if not lo <= number <= hi:
        raise ValidationFailed(f"{_where(key, lines)}: must be in [{lo}, {hi}], got {number}")
    return int(number)


def _float_in(value: object, key: str, lo: float, hi: float, lines: dict[str, int]) -> float:
    try:
        number = _typed(value, float, key)
    except ValidationFailed as exc:
        raise ValidationFailed(exc.message.replace(key, _where(key, lines), 1)) from None
    if not lo <= number <= hi:
        raise ValidationFailed(f"{_where(key, lines)}: must be in [{lo}, {hi}], got {number}")
    return float(number)


_TOP = {
    "name", "model", "handler", "auth", "backend", "resources", "scale", "generation", "env",
}  # fmt: skip


def _build(data: dict[str, Any], *, lines: dict[str, int], internal: bool) -> FunctionSpec:
    for key in data:
        if key not in _TOP:
            raise ValidationFailed(
                f"{_where(str(key), lines)}: unknown key (allowed: {', '.join(sorted(_TOP))})"
            )
    for required in ("name", "model"):
        if required not in data:
            raise ValidationFailed(f"{required}: required key is missing")
    try:
        name = validate_name(data["name"])
    except ValidationFailed as exc:
        raise ValidationFailed(exc.message.replace("name", _where("name", lines), 1)) from None
    model = data["model"]
    if not isinstance(model, str) or not model.strip():
        raise ValidationFailed(f"{_where('model', lines)}: expected a local path or store URL")
    handler = data.get("handler", "chat")
    if not isinstance(handler, str) or not HANDLER_RE.match(handler):
        raise ValidationFailed(
            f"{_where('handler', lines)}: expected 'chat', 'completion', 'embedding' or "
            "'module:function', "
            f"got {handler!r}"
        )
    backend = data.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValidationFailed(
            f"{_where('backend', lines)}: expected one of {', '.join(BACKENDS)}, got {backend!r}"
        )

    auth = data.get("auth", "private")
    if auth not in AUTH_MODES:
        raise ValidationFailed(
            f"{_where('auth', lines)}: expected 'public' or 'private', got {auth!r}"
        )

    res_keys = {"accelerators", "memory_bytes"} if internal else {"accelerators", "memory"}
    res = _section(data, "resources", res_keys, lines)
    memory_key = "memory_bytes" if internal else "memory"
    resources = Resources(
        accelerators=_int_in(res.get("accelerators", 1), "resources.accelerators", 0, 16, lines),
        memory_bytes=(
            parse_memory(res[memory_key], _where(f"resources.{memory_key}", lines))
            if memory_key in res
            else Resources().memory_bytes
        ),
    )

    sc_keys = {"min", "max", "target_concurrency", "keep_alive_s" if internal else "keep_alive"}
    sc = _section(data, "scale", sc_keys, lines)
    keep_key = "keep_alive_s" if internal else "keep_alive"
    scale = Scale(
        min=_int_in(sc.get("min", 0), "scale.min", 0, 1000, lines),
        max=_int_in(sc.get("max", 4), "scale.max", 1, 1000, lines),
        target_concurrency=_int_in(
            sc.get("target_concurrency", 4), "scale.target_concurrency", 1, 10_000, lines
        ),
        keep_alive_s=(
            parse_duration(sc[keep_key], _where(f"scale.{keep_key}", lines))
            if keep_key in sc
            else Scale().keep_alive_s
        ),
    )
    if scale.min > scale.max:
        raise ValidationFailed(
            f"{_where('scale.min', lines)}: min ({scale.min}) is greater than max ({scale.max})"
        )

    gen = _section(data, "generation", {"max_tokens", "temperature", "top_p"}, lines)
    generation = Generation(
        max_tokens=_int_in(gen.get("max_tokens", 256), "generation.max_tokens", 1, 32768, lines),
        temperature=_float_in(
            gen.get("temperature", 0.7), "generation.temperature", 0.0, 2.0, lines
        ),
        top_p=_float_in(gen.get("top_p", 1.0), "generation.top_p", 0.0, 1.0, lines),
    )

    env_raw = data.get("env") or {}
    if not isinstance(env_raw, dict):
        raise ValidationFailed(f"{_where('env', lines)}: expected a mapping of strings")
    env: dict[str, str] = {}
    for k, v in env_raw.items():
        if not isinstance(k, str) or not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ValidationFailed(f"{_where(f'env.{k}', lines)}: expected a string value")
        env[k] = str(v)

    return FunctionSpec(
        name=name,
        model=model.strip(),
        handler=handler,
        auth=str(auth),
        backend=str(backend),
        resources=resources,
        scale=scale,
        generation=generation,
        env=env,
    )
