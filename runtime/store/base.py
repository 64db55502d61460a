"""The model store port (STYLE.md 4): where converted checkpoints live, read by key.

A key is a ``/``-separated object name relative to the store's root, e.g.
``checkpoints/chat/0123456789abcdef/data-00000.bin``. Two adapters implement ``Store``:
``LocalStore`` (a directory, the embedded default) and ``S3Store`` (any S3-compatible server).

Every method raises ``StoreError`` with a message naming the object (or bucket) and what went
wrong; a missing object has ``code == "store_not_found"``, a missing bucket
``"store_bucket_not_found"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sllm.errors import StoreError
from sllm.spec import checkpoint_key_problem

# Called with the number of bytes just transferred (not a running total).
Progress = Callable[[int], None]

NOT_FOUND = "store_not_found"
BUCKET_NOT_FOUND = "store_bucket_not_found"


def no_progress(_n: int) -> None:
    return None


def join_key(*parts: str) -> str:
    """Join key segments with ``/``, ignoring empty ones (``join_key("", "a")`` is ``"a"``)."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def validate_key(key: str) -> str:
    """Refuse keys that could escape the store root (``..``, absolute, backslashes, NUL)."""
    problem = checkpoint_key_problem(key)
    if problem is not None:
        raise StoreError(f"invalid store key {key!r}: {problem}")
    return key


def not_found(what: str) -> StoreError:
    return StoreError(f"{what} not found in the store", code=NOT_FOUND, status=404)


class Store(Protocol):
    """Blocking object access; safe to call from several threads at once."""

    @property
    def url(self) -> str:
        """The store's URL (a directory path or ``s3://bucket/prefix``), for messages."""
        ...

    @property
    def concurrency(self) -> int:
        """How many requests this store serves well in parallel (ranged GETs, upload parts)."""
        ...

    @property
    def part_size(self) -> int:
        """Bytes per ranged read / upload part that this store is tuned for."""
        ...

    def describe(self, key: str) -> str:
        """The full address of ``key`` for error messages (``s3://b/p/key``, a path)."""
        ...

    def size(self, key: str) -> int:
        """Size of the object in bytes; ``StoreError`` (store_not_found) if it is missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), sorted."""
        ...

    def read_range(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the object's bytes ``[offset, offset + len(buf))``.

        Raises ``StoreError`` if the object is shorter than that."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole (small) object: index.json, config files."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str, progress: Progress = no_progress) -> None:
        """Upload a local file (large files in parallel parts); ``progress`` gets byte counts."""
        ...
