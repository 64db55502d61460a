"""The node -> instance process contract: what to load, one JSON line on the instance's stdin.

Typed and versioned like the NATS messages (``sllm.messages``): the line is ``{"cmd": "load",
"v": LOAD_SPEC_VERSION, ...fields}``, and the instance refuses a line of another version, a
field of the wrong type, a missing field or one it does not know (``ProtocolError`` naming
it). No torch here: the node imports it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sllm.errors import ProtocolError
from sllm.messages import from_dict

LOAD_SPEC_VERSION = 1


@dataclass(frozen=True)
class LoadSpec:
    """What the node tells a waiting instance process to load."""

    instance_id: str
    function: str
    handler: str
    entry_dir: str
    device: str
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    handler_dir: str = ""
    handler_source: dict[str, str] = field(default_factory=dict)
    max_batch: int = 16
    threads: int = 0
    # what every caller must send (sllm.instance_auth); a load without one fails
    secret: str = field(default="", repr=False)
    memory_bytes: int = 2 << 30  # the function's resources.memory (vLLM: weights + KV cache)
    cache_dir: str = ""  # the node's cache directory
    backend: str = "transformers"  # the node's choice (runtime.backend.choice)

    def to_json(self) -> dict[str, Any]:
        """The load command line's map (``json.dumps`` it)."""
        return {"cmd": "load", "v": LOAD_SPEC_VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> LoadSpec:
        """A load command line's map as a ``LoadSpec``; ``ProtocolError`` naming what is wrong."""
        body = dict(data)
        if body.pop("cmd", "load") != "load":
            raise ProtocolError(f"load spec: not a load command: {data.get('cmd')!r}")
        version = body.pop("v", None)
        if version != LOAD_SPEC_VERSION:
            raise ProtocolError(
                f"load spec: unsupported version {version!r} (this side speaks {LOAD_SPEC_VERSION})"
            )
        return from_dict(LoadSpec, body, "load spec")
