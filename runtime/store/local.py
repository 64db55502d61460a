"""``Store`` on a local directory: the embedded default of `sllm up`.

Writes go to a temporary name and are renamed into place, so a reader never sees a partial
object; reads are ``preadv`` straight into the caller's buffer (no intermediate copy).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from runtime.loader.direct_io import read_full
from runtime.store.base import Progress, no_progress, not_found, validate_key
from sllm.errors import StoreError

# 8 MiB copy chunks: large enough that per-call overhead is noise, small enough for progress.
_COPY_CHUNK = 8 << 20


class LocalStore:
    def __init__(self, root: Path, concurrency: int = 4, part_size: int = 16 << 20) -> None:
        self.root = Path(root)
        self._concurrency = concurrency
        self._part_size = part_size

    @property
    def url(self) -> str:
        return str(self.root)

    @property
    def concurrency(self) -> int:
        return self._concurrency

    @property
    def part_size(self) -> int:
        return self._part_size

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise not_found(self.describe(key)) from None
        except OSError as exc:
            raise StoreError(f"{self.describe(key)}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(keys)

    def read_range(self, key: str, offset: int, buf: memoryview) -> None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise not_found(self.describe(key)) from None
        try:
            got = read_full(fd, buf, offset)
            if got < len(buf):
                raise StoreError(
                    f"{self.describe(key)}: object ends at byte {offset + got}, "
                    f"expected at least {offset + len(buf)}"
                )
        except OSError as exc:
            raise StoreError(f"{self.describe(key)}: read failed: {exc.strerror}") from None
        finally:
            os.close(fd)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise not_found(self.describe(key)) from None

    def _write_atomic(self, key: str, write: Callable[[Path], object]) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".tmp-{dst.name}.{uuid.uuid4().hex[:8]}"
        try:
            write(tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"{self.describe(key)}: write failed: {exc.strerror}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda tmp: tmp.write_bytes(data))

    def put_file(self, key: str, path: str, progress: Progress = no_progress) -> None:
        def copy(tmp: Path) -> None:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
                    progress(len(chunk))

        self._write_atomic(key, copy)
