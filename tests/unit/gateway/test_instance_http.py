"""The gateway's HTTP/1.1 client against scripted loopback servers: framing, keep-alive reuse,
stale connections, and errors that say how far the exchange got."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.instance_http import InstanceHttpClient, NoResponse, ResponseBroken, ResponseTimeout
from sllm_cli.servers import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await script(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        yield f"http://127.0.0.1:{port}", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def client() -> InstanceHttpClient:
    return InstanceHttpClient(connect_timeout_s=2, read_timeout_s=2)


async def test_content_length_bodies_reuse_one_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            await writer.drain()

    async with server(script) as (url, connections):
        c = client()
        for i in range(3):
            response = await c.post(f"{url}/v1/x", b'{"n": %d}' % i)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert await response.aread() == b'{"n": %d}' % i
            await response.aclose()
        assert len(connections) == 1
        await c.aclose()


async def test_chunked_bodies_arrive_piece_by_piece_with_extensions_and_trailers() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
        )
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\nx-trailer: y\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(script) as (url, _):
        c = client()
        response = await c.post(f"{url}/s", b"{}")
        assert [p async for p in response.aiter_raw()] == [b"data: 1\n\n", b"data: 2\n\n"]
        await response.aclose()
        await c.aclose()


async def test_a_body_read_to_close_without_length() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()

    async with server(script) as (url, _):
        c = client()
        response = await c.post(url, b"{}")
        assert await response.aread() == b"all of it"
        await response.aclose()
        await c.aclose()


async def test_a_stale_keep_alive_connection_is_replaced_transparently() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # then close the kept-alive connection, as uvicorn does after its idle timeout

    async with server(script) as (url, connections):
        c = client()
        for _ in range(2):
            response = await c.post(url, b"{}")
            assert await response.aread() == b"ok"
            await response.aclose()
            await asyncio.sleep(0.05)
        assert len(connections) == 2
        await c.aclose()


async def test_nothing_listening_is_no_response() -> None:
    with pytest.raises(NoResponse, match="connect"):
        await client().post(f"http://127.0.0.1:{free_port()}/v1/generate", b"{}")


async def test_a_connection_closed_before_answering_is_no_response() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with server(script) as (url, _):
        with pytest.raises(NoResponse):
            await client().post(url, b"{}")


async def test_a_body_cut_short_is_broken() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with server(script) as (url, _):
        response = await client().post(url, b"{}")
        pieces = []
        with pytest.raises(ResponseBroken):
            async for piece in response.aiter_raw():
                pieces.append(piece)
        assert pieces == [b"hello"]
        await response.aclose()


async def test_silence_is_a_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with server(script) as (url, _):
        c = InstanceHttpClient(connect_timeout_s=1, read_timeout_s=0.2)
        with pytest.raises(ResponseTimeout):
            await c.post(url, b"{}")


async def test_connections_too_old_to_reuse_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.instance_http as module

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    monkeypatch.setattr(module, "IDLE_REUSE_S", 0.05)
    async with server(script) as (a, _), server(script) as (b, _):
        c = client()
        for url in (a, b):
            response = await c.post(url, b"{}")
            await response.aread()
            await response.aclose()
        assert len(c._idle) == 2
        await asyncio.sleep(0.1)
        response = await c.post(b, b"{}")
        await response.aread()
        await response.aclose()
        assert list(c._idle) == [("127.0.0.1", int(b.rsplit(":", 1)[1]))]
        await c.aclose()
