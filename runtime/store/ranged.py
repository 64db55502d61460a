"""Ranged GETs of presigned object URLs, read straight into the caller's buffer.

Why not boto3's ``get_object`` for the checkpoint's bytes: its body (urllib3) reads each range
into new ``bytes`` and copies them into the buffer, and every request runs botocore's whole
request and response pipeline. Measured on the 2-core VM against SeaweedFS on loopback
(2026-12-05, 1 GiB in 16 MiB ranges, 8 threads, medians of 6): ``get_object`` 1.16 GB/s with
0.60 s of client CPU per GiB; this module 1.68 GB/s with 0.33 s; curl 1.50 GB/s. Here
``http.client``'s ``readinto`` fills the buffer from the socket, and the boto3 client still
signs (``generate_presigned_url``: SigV4, host signed, the ``Range`` header not), so
credentials, their refresh and the bucket addressing stay boto3's.

- Connections: a pool of keep-alive connections per origin, one in use per request at a time;
  closed by ``close()`` or when the getter is collected. A request on a reused connection that
  fails before an answer came is sent once more on a new connection (the server may have
  closed it while idle), as HTTP clients do.
- Proxies: taken from the environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``; Basic
  credentials in the proxy's URL), as botocore takes them. TLS: the system's trust store, or
  ``AWS_CA_BUNDLE``.
- Errors: an answer other than ``206`` with the asked range raises ``RangeAnswerError`` (its
  status and body, for the caller to read the S3 error code from); a connection or protocol
  failure raises ``RangeTransferError``. Neither is retried here: the caller's retry loop owns
  the bound.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
import threading
import urllib.request
import weakref
from urllib.parse import SplitResult, unquote, urlsplit

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# An error answer is a short XML document; more is not read.
_ERROR_BODY_LIMIT = 64 << 10


class RangeAnswerError(Exception):
    """The server answered with ``status`` (not 206); ``body`` is the start of its answer."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.body = body


class RangeTransferError(Exception):
    """The connection failed or the answer broke the protocol; trying again may succeed."""


class RangedGetter:
    """``read_into(url, offset, buf)``: GET ``len(buf)`` bytes of ``url`` from ``offset``.
    Thread-safe."""

    def __init__(self, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._idle: dict[tuple[object, ...], list[http.client.HTTPConnection]] = {}
        self._ssl: ssl.SSLContext | None = None
        weakref.finalize(self, _close_idle, self._idle, self._lock)

    def read_into(self, url: str, offset: int, buf: memoryview) -> int:
        """Bytes read into ``buf``: ``len(buf)``, or fewer when the object ends first (the
        answer's ``Content-Range`` says where)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url.split('?')[0]!r}")
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else (parts.path or "/")
        headers = {"Range": f"bytes={offset}-{offset + len(buf) - 1}"}
        proxy = _proxy_for(parts.scheme, parts.hostname)
        if proxy is not None and parts.scheme == "http":
            target = f"http://{parts.netloc}{target}"  # absolute form, to the proxy
            headers.update(_proxy_auth(proxy))
        key = (parts.scheme, parts.hostname, parts.port, proxy)
        for attempt in (0, 1):
            conn, reused = self._take(key, parts, proxy, fresh=attempt > 0)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # closed by the server while idle: once more, on a new one
                raise RangeTransferError(f"{type(exc).__name__}: {exc}") from None
            try:
                got = self._body(resp, offset, buf)
            except BaseException:
                conn.close()
                raise
            if resp.will_close or not resp.isclosed():  # bytes left unread: not reusable
                conn.close()
            else:
                with self._lock:
                    self._idle.setdefault(key, []).append(conn)
            return got
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections (those in use close when their request ends)."""
        _close_idle(self._idle, self._lock)

    def _body(self, resp: http.client.HTTPResponse, offset: int, buf: memoryview) -> int:
        if resp.status != 206:
            try:
                body = resp.read(_ERROR_BODY_LIMIT)
            except (OSError, http.client.HTTPException):
                body = b""
            raise RangeAnswerError(resp.status, resp.reason, body)
        match = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range", ""))
        if match is None or int(match[1]) != offset or int(match[2]) >= offset + len(buf):
            raise RangeTransferError(
                f"answer to a ranged GET from byte {offset} has Content-Range "
                f"{resp.getheader('Content-Range')!r}"
            )
        expected = min(int(match[2]) - offset + 1, len(buf))
        if resp.getheader("Content-Encoding", "identity") != "identity":
            raise RangeTransferError(
                f"answer is encoded ({resp.getheader('Content-Encoding')}); expected raw bytes"
            )
        pos = 0
        try:
            while pos < expected:
                n = resp.readinto(buf[pos:expected])
                if not n:
                    break
                pos += n
        except (OSError, http.client.HTTPException) as exc:
            raise RangeTransferError(f"{type(exc).__name__} after {pos} bytes: {exc}") from None
        if pos != expected:
            raise RangeTransferError(f"connection closed after {pos} of {expected} bytes")
        return pos

    def _take(
        self, key: tuple[object, ...], parts: SplitResult, proxy: str | None, fresh: bool
    ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection for ``key`` (unless ``fresh``) or a new one; and whether it
        was used before."""
        if not fresh:
            with self._lock:
                idle = self._idle.get(key)
                if idle:
                    return idle.pop(), True
        return self._open(parts.scheme, parts.hostname or "", parts.port, proxy), False

    def _open(
        self, scheme: str, host: str, port: int | None, proxy: str | None
    ) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        port = port or (443 if scheme == "https" else 80)
        where = f"{host}:{port}"
        if proxy is not None:
            pp = urlsplit(proxy)
            where += f" via the proxy at {pp.hostname}:{pp.port or 8080}"  # not its credentials
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    pp.hostname or "", pp.port or 8080, timeout=self.connect_timeout_s,
                    context=self._ssl_context(),
                )  # fmt: skip
                conn.set_tunnel(host, port, headers=_proxy_auth(proxy))
            else:
                conn = http.client.HTTPConnection(
                    pp.hostname or "", pp.port or 8080, timeout=self.connect_timeout_s
                )
        elif scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout_s, context=self._ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout_s)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise RangeTransferError(f"cannot connect to {where}: {exc}") from None
        assert conn.sock is not None
        conn.sock.settimeout(self.read_timeout_s)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        return self._ssl


def _close_idle(
    idle: dict[tuple[object, ...], list[http.client.HTTPConnection]], lock: threading.Lock
) -> None:
    with lock:
        conns = [c for group in idle.values() for c in group]
        idle.clear()
    for conn in conns:
        conn.close()


def _proxy_auth(proxy: str) -> dict[str, str]:
    """Basic credentials for a proxy URL that carries them (``http://user:pass@host:port``)."""
    pp = urlsplit(proxy)
    if pp.username is None:
        return {}
    pair = f"{unquote(pp.username)}:{unquote(pp.password or '')}".encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def _proxy_for(scheme: str, host: str) -> str | None:
    """The environment's proxy URL for ``scheme`` to ``host``, or None (none set, or NO_PROXY
    lists the host)."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"
