"""A small HTTP/1.1 client for the gateway -> instance hop, on asyncio streams.

Why not httpx: on this hop the gateway is pure overhead, and httpx costs milliseconds per
request and degrades with many pooled connections (measured here against a trivial backend:
258 req/s one at a time and 81 req/s over 32 pooled connections, against ~2,000 req/s for a raw
keep-alive client). The
instances are ours (uvicorn, HTTP/1.1), so the client needs only: POST with a body, keep-alive
connections pooled per address, responses with Content-Length, chunked or read-to-close bodies,
streamed piece by piece as they arrive (server-sent events stay unbuffered).

Errors say how far the exchange got, which is what the proxy's retry rule needs:
``NoResponse`` (nothing came back: the instance is gone or never answered), ``ResponseBroken``
(the connection failed after the response started), ``ResponseTimeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

# uvicorn closes idle keep-alive connections after 5 s: reuse only younger ones. (Connection
# age is transport bookkeeping, not a decision, so it reads time.monotonic directly.)
IDLE_REUSE_S = 4.0
MAX_IDLE_PER_ADDRESS = 256
READ_SIZE = 65536


class UpstreamError(Exception):
    pass


class NoResponse(UpstreamError):
    """The instance could not be reached, or closed the connection before answering."""


class ResponseBroken(UpstreamError):
    """The connection failed or the framing was invalid after the response began."""


class ResponseTimeout(UpstreamError):
    pass


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


class InstanceResponse:
    """Status and headers have arrived; the body is read with ``aiter_raw``. ``aclose`` must
    be called (it returns a fully read keep-alive connection to the pool, else closes it)."""

    def __init__(
        self,
        client: InstanceHttpClient,
        key: tuple[str, int],
        conn: _Conn,
        status: int,
        headers: dict[str, str],
        read_timeout_s: float,
    ) -> None:
        self._client, self._key, self._conn = client, key, conn
        self.status_code = status
        self.headers = headers
        self._timeout = read_timeout_s
        self._done = status in (204, 304) or 100 <= status < 200
        self._reusable = headers.get("connection", "").lower() != "close"
        self.is_closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        reader = self._conn.reader
        try:
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                async for piece in self._chunked(reader):
                    yield piece
            elif "content-length" in self.headers:
                remaining = int(self.headers["content-length"])
                while remaining > 0:
                    async with asyncio.timeout(self._timeout):
                        data = await reader.read(min(remaining, READ_SIZE))
                    if not data:
                        raise ResponseBroken("connection closed before the end of the body")
                    remaining -= len(data)
                    yield data
            else:
                self._reusable = False  # the body ends when the server closes
                while True:
                    async with asyncio.timeout(self._timeout):
                        data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    yield data
        except TimeoutError:
            raise ResponseTimeout(f"no data for {self._timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise ResponseBroken(f"{type(exc).__name__}: {exc}") from None
        self._done = True

    async def _chunked(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            async with asyncio.timeout(self._timeout):
                line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                async with asyncio.timeout(self._timeout):
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                return
            async with asyncio.timeout(self._timeout):
                data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise ResponseBroken("malformed chunk")
            yield data[:-2]

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_raw()])

    async def aclose(self) -> None:
        """Synchronous inside, so it completes even in a cancelled scope."""
        if self.is_closed:
            return
        self.is_closed = True
        if self._done and self._reusable:
            self._client._release(self._key, self._conn)
        else:
            self._conn.close()


class InstanceHttpClient:
    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._targets: dict[str, tuple[str, int, str]] = {}
        self._swept = time.monotonic()

    async def post(
        self, url: str, body: bytes, content_type: str = "application/json", secret: str = ""
    ) -> InstanceResponse:
        """POST ``body`` to ``url`` (http://host:port/path) with the instance's ``secret``
        (sllm.instance_auth); returns once the status line and headers arrived. A reused
        connection the server had closed is retried once on a new one (the request never
        reached the application)."""
        host, port, path = self._target(url)
        key = (host, port)
        auth = f"authorization: Bearer {secret}\r\n" if secret else ""
        request = (
            f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: {content_type}\r\n"
            f"{auth}content-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, request)
            except NoResponse:
                pass  # a stale keep-alive connection: try a fresh one
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
        except TimeoutError:
            raise NoResponse(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise NoResponse(f"connect to {host}:{port} failed: {exc}") from None
        return await self._exchange(key, _Conn(reader, writer), request)

    async def _exchange(
        self, key: tuple[str, int], conn: _Conn, request: bytes
    ) -> InstanceResponse:
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            async with asyncio.timeout(self._read_timeout):
                head = await conn.reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            conn.close()
            raise ResponseTimeout(f"no answer for {self._read_timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            conn.close()
            raise NoResponse(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.close()  # cancelled mid-exchange: the connection's state is unknown
            raise
        lines = head[:-4].split(b"\r\n")
        try:
            version, code, *_ = lines[0].split(b" ", 2)
            status = int(code)
        except ValueError:
            conn.close()
            raise ResponseBroken(f"malformed status line {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if version != b"HTTP/1.1":
            headers.setdefault("connection", "close")
        return InstanceResponse(self, key, conn, status, headers, self._read_timeout)

    def _target(self, url: str) -> tuple[str, int, str]:
        base, _, rest = url.partition("://")
        origin, slash, path = rest.partition("/")
        cached = self._targets.get(origin)
        if cached is None:
            parts = urlsplit(f"{base}://{origin}")
            if parts.scheme != "http" or not parts.hostname:
                raise NoResponse(f"unsupported instance address {url!r} (http://host:port)")
            cached = (parts.hostname, parts.port or 80, "")
            self._targets[origin] = cached
        return cached[0], cached[1], slash + path if slash else "/"

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_REUSE_S and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    def _release(self, key: tuple[str, int], conn: _Conn) -> None:
        now = time.monotonic()
        if now - self._swept > IDLE_REUSE_S:
            self._sweep(now)
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_ADDRESS or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def _sweep(self, now: float) -> None:
        """Close connections too old to reuse, also those of instances that are gone (their
        sockets would otherwise linger half-closed)."""
        self._swept = now
        for key in list(self._idle):
            keep = [c for c in self._idle[key] if now - c.idle_since < IDLE_REUSE_S]
            for conn in self._idle[key]:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
