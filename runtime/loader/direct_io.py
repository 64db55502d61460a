"""Low-level file reads for the loader: O_DIRECT with a clean fallback, and page-cache residency.

On this machine (DESIGN.md, "This machine") O_DIRECT reaches the disk limit cold but ignores a
warm page cache (5x under the warm limit), so the loader asks the kernel which pages are
resident (``Residency``: ``cachestat``, else ``mincore`` on a read-only mapping; neither reads
anything) and reads resident ranges buffered, the rest direct. Every function here degrades
to buffered reads: file systems without O_DIRECT (tmpfs, some overlays) return EINVAL on open
or on the read, and the caller retries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

PAGE = mmap.PAGESIZE
# O_DIRECT needs buffer address, file offset and length aligned to the logical block size
# (512 or 4096 bytes); 4096 satisfies both.
DIRECT_ALIGN = 4096

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


# Linux 5.14+: fault pages in writable without writing them (not in every Python's mmap).
MADV_POPULATE_WRITE = 23


def populate_write(address: int, length: int) -> bool:
    """Populate the page tables of ``[address, address+length)`` for writing, in one call
    (through ctypes, which lets go of the GIL: ``mmap.madvise`` keeps it). The range is
    widened to whole pages. False where the kernel cannot (< 5.14) or the range is not
    mapped; then pages just fault in on first write."""
    if length <= 0:
        return True
    start = address - address % PAGE
    try:
        libc = _get_libc()
    except OSError:
        return False
    status: int = libc.madvise(
        ctypes.c_void_p(start), length + address - start, MADV_POPULATE_WRITE
    )
    return status == 0


def page_residency(fd: int, size: int) -> bytes | None:
    """One byte per page of the file's first ``size`` bytes, bit 0 set when the page is in
    the page cache; None when it cannot be told (then treat the file as cold)."""
    if size <= 0:
        return b""
    try:
        libc = _get_libc()
    except OSError:
        return None
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            return None
        return bytes(vec)
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)


def resident_fraction(residency: bytes | None, offset: int, length: int) -> float:
    """Fraction of the pages of ``[offset, offset+length)`` that are cached (0.0 if unknown)."""
    if residency is None or length <= 0:
        return 0.0
    first, last = offset // PAGE, (offset + length - 1) // PAGE + 1
    window = residency[first:last]
    if not window:
        return 0.0
    # pages not in the cache are 0; other bits are reserved (0), so counting zeros is exact
    return 1.0 - window.count(0) / len(window)


# cachestat(2), Linux 6.5+: how many of a file range's pages are in the page cache, without
# mapping the file (``page_residency`` maps it and walks every page: 15 ms for a cached 1 GB
# file here, cachestat 1.4 ms; measured). One number on every architecture.
_SYS_CACHESTAT = 451
_cachestat_missing = False  # the kernel (or a seccomp filter) refused it once: not asked again


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of the file's ``[offset, offset+length)`` in the page cache (cachestat), or None
    where the kernel cannot tell that way."""
    global _cachestat_missing
    if _cachestat_missing:
        return None
    if length <= 0:  # (a length of 0 would ask cachestat for the rest of the file)
        return 0
    try:
        libc = _get_libc()
    except OSError:
        _cachestat_missing = True
        return None
    span, stat = _CachestatRange(offset, length), _Cachestat()
    status = libc.syscall(
        ctypes.c_long(_SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(span),
        ctypes.byref(stat), ctypes.c_uint(0),
    )  # fmt: skip
    if status != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat_missing = True
        return None
    return int(stat.nr_cache)


class Residency:
    """Which ranges of one file (``size`` bytes) are in the page cache: cachestat per range,
    else one ``page_residency`` of the whole file, taken at the first question."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._pages: bytes | None = None
        self._mapped = False

    def fraction(self, offset: int, length: int) -> float:
        """Fraction of the pages of ``[offset, offset+length)`` that are cached (0.0 if
        unknown)."""
        length = min(length, self.size - offset)
        if length <= 0:
            return 0.0
        cached = cached_pages(self.fd, offset, length)
        if cached is not None:
            return cached / ((offset + length - 1) // PAGE - offset // PAGE + 1)
        if not self._mapped:
            self._pages, self._mapped = page_residency(self.fd, self.size), True
        return resident_fraction(self._pages, offset, length)


def open_direct(path: str) -> int | None:
    """An O_DIRECT read-only fd, or None where the file system refuses O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def read_into(
    fd_buffered: int,
    fd_direct: int | None,
    dest: memoryview,
    offset: int,
    length: int,
) -> bool:
    """Fill ``dest[:length]`` with file bytes from ``offset``. With ``fd_direct`` the read is
    O_DIRECT: ``dest`` must be aligned and hold ``length`` rounded up to ``DIRECT_ALIGN``; a
    refused direct read (EINVAL) falls back to a buffered one. Returns whether the read was
    direct. Raises ``EOFError`` if the file ends first."""
    if fd_direct is not None and offset % DIRECT_ALIGN == 0:
        padded = (length + DIRECT_ALIGN - 1) // DIRECT_ALIGN * DIRECT_ALIGN
        try:
            _read_full(fd_direct, dest[:padded], offset, length)
            return True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _read_full(fd_buffered, dest[:length], offset, length)
    return False


def read_full(fd: int, dest: memoryview, offset: int, need: int | None = None) -> int:
    """Read ``need`` bytes (default ``len(dest)``) at ``offset`` into ``dest`` with ``preadv``,
    looping over short reads. Returns the bytes read: fewer than ``need`` only if the file
    ended first (callers decide whether that is an error)."""
    need = len(dest) if need is None else need
    pos = 0
    while pos < need:
        n = os.preadv(fd, [dest[pos:]], offset + pos)
        if n == 0:
            break
        pos += n
    return pos


def _read_full(fd: int, dest: memoryview, offset: int, need: int) -> None:
    got = read_full(fd, dest, offset, need)
    if got < need:
        raise EOFError(f"file ended at byte {offset + got}, expected {offset + need}")
