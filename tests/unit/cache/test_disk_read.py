"""Reading SSD partitions into an image: residency detection and both read modes."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from runtime.cache.disk_read import read_partitions, resident_fraction
from runtime.cache.synthetic import write_random_checkpoint
from runtime.ckpt.index import image_layout


def test_resident_fraction_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    assert resident_fraction(path) > 0.9  # just written: in the page cache
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert resident_fraction(path) < 0.5
    (tmp_path / "empty").write_bytes(b"")
    assert resident_fraction(tmp_path / "empty") == 0.0


@pytest.mark.parametrize("direct", [True, False, None])
def test_read_partitions_fills_the_image(tmp_path: Path, direct: bool | None) -> None:
    # Odd sizes: the last chunk of each partition is not 4096-aligned.
    index = write_random_checkpoint(tmp_path, (3 * (1 << 20) + 77, 5000))
    starts, size = image_layout(index)
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    read_partitions(tmp_path, index, view, chunk_bytes=1 << 20, direct=direct)
    for start, p in zip(starts, index.partitions, strict=True):
        assert view[start : start + p.nbytes] == (tmp_path / p.file).read_bytes()
    view.release()
    buf.close()
