"""Invocation keys: who may call a private function.

A key is ``sllm_<id>_<secret>``: ``id`` (12 hex digits) names it in listings and revocation,
``secret`` is 32 random bytes (URL-safe base64). Only ``sha256(secret)`` is stored, as JSON under
``key.<id>`` in the registry bucket, with the key's name, creation time and the functions it
may call (none listed: every function).

Why sha256 and not a slow password hash (pbkdf2, scrypt): those exist to make guessing a
low-entropy password expensive. A 256-bit random secret cannot be guessed whatever the hash,
so a slow hash would add nothing but its cost to every request (pbkdf2-sha256 at 600,000
iterations takes about 0.3 s on this machine's cores).

Several gateways share the bucket, so a key is checked against it at most once every
``ttl_s`` (1 s) per key: a key created or revoked through any gateway holds at every gateway
within that time, and a busy key costs one bucket read a second.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sllm.bus import KeyValue
from sllm.clock import Clock
from sllm.errors import InvalidInput, NotFound, ValidationFailed
from sllm.spec import validate_name

log = logging.getLogger(__name__)

KEY_PREFIX = "key."
TOKEN_PREFIX = "sllm_"
_TOKEN_RE = re.compile(r"^sllm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# 1 s: how stale a gateway's view of a key may be (see the module docstring).
TTL_S = 1.0
# Cached lookups kept at most (unknown ids included); past that the cache starts over.
MAX_CACHED = 10_000


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    functions: tuple[str, ...]
    created: float
    sha256: str = field(repr=False)

    def allows(self, function: str) -> bool:
        return not self.functions or function in self.functions

    def summary(self) -> dict[str, Any]:
        """What listings show: never the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "functions": list(self.functions),
            "created": self.created,
        }

    def to_json(self) -> bytes:
        return json.dumps({**self.summary(), "sha256": self.sha256}).encode()

    @staticmethod
    def from_json(raw: bytes) -> ApiKey:
        data = json.loads(raw)
        return ApiKey(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            functions=tuple(str(f) for f in data.get("functions") or ()),
            created=float(data.get("created", 0.0)),
            sha256=str(data["sha256"]),
        )


def parse_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    m = _TOKEN_RE.match(token)
    return (m.group(1), m.group(2)) if m else None


def validate_request(data: object) -> tuple[str, tuple[str, ...]]:
    """A ``POST /system/keys`` body -> (name, functions); 400 naming the field otherwise."""
    if not isinstance(data, dict):
        raise InvalidInput("body: expected an object {name, functions}")
    unknown = set(data) - {"name", "functions"}
    if unknown:
        raise InvalidInput(f"{sorted(unknown)[0]}: unknown key (allowed: functions, name)")
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > 64:
        raise InvalidInput(f"name: expected a string of at most 64 characters, got {name!r}")
    functions = data.get("functions") or []
    if not isinstance(functions, list):
        raise InvalidInput(f"functions: expected a list of function names, got {functions!r}")
    for i, fn in enumerate(functions):
        try:
            validate_name(fn, f"functions[{i}]")
        except ValidationFailed as exc:
            raise InvalidInput(exc.message) from None
    return name, tuple(sorted(set(functions)))


class KeyStore:
    def __init__(self, kv: KeyValue, clock: Clock, wall: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock
        self._wall = wall
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def create(self, name: str, functions: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key; the token (returned once, never stored) is what callers send."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, tuple(functions), round(self._wall(), 3), digest(secret))
        await self._kv.put(KEY_PREFIX + key_id, key.to_json())
        self._cache[key_id] = (key, self._clock.now())
        log.info("key created id=%s name=%s functions=%s", key_id, name, list(functions) or "*")
        return key, f"{TOKEN_PREFIX}{key_id}_{secret}"

    async def all(self) -> list[ApiKey]:
        keys = []
        for name in await self._kv.keys():
            if not name.startswith(KEY_PREFIX):
                continue
            key = await self._read(name[len(KEY_PREFIX) :])
            if key is not None:
                keys.append(key)
        return sorted(keys, key=lambda k: (k.created, k.id))

    async def revoke(self, key_id: str) -> None:
        if await self._read(key_id) is None:
            raise NotFound(f"key {key_id!r} does not exist (sllm key list shows the keys)")
        await self._kv.delete(KEY_PREFIX + key_id)
        self._cache[key_id] = (None, self._clock.now())
        log.info("key revoked id=%s", key_id)

    async def verify(self, token: str) -> ApiKey | None:
        """The key ``token`` is, if it exists and its secret matches; else None."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        cached = self._cache.get(key_id)
        if cached is not None and self._clock.now() - cached[1] < TTL_S:
            key = cached[0]
        else:
            key = await self._read(key_id)
        if key is None or not hmac.compare_digest(digest(secret), key.sha256):
            return None
        return key

    async def _read(self, key_id: str) -> ApiKey | None:
        if not re.fullmatch(r"[0-9a-f]{12}", key_id):
            return None
        raw = await self._kv.get(KEY_PREFIX + key_id)
        key: ApiKey | None = None
        if raw is not None:
            try:
                key = ApiKey.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("key %s: unreadable record skipped (%s)", key_id, type(exc).__name__)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[key_id] = (key, self._clock.now())
        return key
