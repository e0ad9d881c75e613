"""The proxy hop's httpx transport against a scripted raw HTTP/1.1 server: streaming, keep-alive, failures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tandem.router.transport import BODY_COMPLETE, AsyncioHTTPTransport, ProxyClient


class ScriptedServer:
    """Reads each request (head and Content-Length body) and lets the test's ``answer`` coroutine respond."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                if await self.answer(len(self.requests), reader, writer) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedServer]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_streams_each_read_as_it_arrives_and_reuses_the_connection():
    release = asyncio.Event()

    async def answer(n, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     + chunk(b"data: a\n\n") + chunk(b"data: b\n\n"))
        await writer.drain()
        await release.wait()  # the client must get the first two events before the rest is even sent
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async with ScriptedServer(answer).running() as server, ProxyClient(transport=AsyncioHTTPTransport()) as client:
        for _ in range(2):
            release.clear()
            request = httpx.Request("POST", server.url + "/v1/completions", content=b'{"x": 1}',
                                    headers={"x-request-id": "r1"})
            response = await client.send(request, stream=True)
            assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
            pieces = response.aiter_raw()
            assert await anext(pieces) == b"data: a\n\ndata: b\n\n"  # one read, one piece
            assert not response.extensions[BODY_COMPLETE]()
            release.set()
            assert await anext(pieces) == b"data: [DONE]\n\n"
            assert response.extensions[BODY_COMPLETE]()
            assert [p async for p in pieces] == []
            await response.aclose()
        assert server.connections == 1  # kept alive and reused
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"x-request-id: r1" in head
        assert body == b'{"x": 1}'


async def test_non_streaming_json_and_no_cookies_kept():
    async def answer(n, reader, writer):
        body = b'{"n": %d}' % n
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nset-cookie: session=%d\r\n"
                     b"content-length: %d\r\n\r\n%s" % (n, len(body), body))

    async with ScriptedServer(answer).running() as server, ProxyClient(transport=AsyncioHTTPTransport()) as client:
        first = await client.post(server.url + "/x", json={"a": 1})
        second = await client.post(server.url + "/x", json={"a": 2})
        assert first.json() == {"n": 1} and second.json() == {"n": 2}
        assert b"cookie" not in server.requests[1].lower().split(b"\r\n\r\n")[0].replace(b"set-cookie", b"")
        assert len(client.cookies) == 0


async def test_body_until_close_and_closed_idle_connection_not_reused():
    async def answer(n, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it")
        return "close"

    async with ScriptedServer(answer).running() as server, ProxyClient(transport=AsyncioHTTPTransport()) as client:
        for _ in range(3):
            assert (await client.get(server.url + "/x")).text == "all of it"
        assert server.connections == 3


async def test_worker_dying_mid_body_or_before_answering_raises_transport_errors():
    async def answer(n, reader, writer):
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: a\n\n"))
            await writer.drain()
        return "close"  # request 1: half a body; request 2: no answer at all

    async with ScriptedServer(answer).running() as server, ProxyClient(transport=AsyncioHTTPTransport()) as client:
        response = await client.send(httpx.Request("POST", server.url + "/x", content=b"{}"), stream=True)
        pieces = response.aiter_raw()
        assert await anext(pieces) == b"data: a\n\n"
        with pytest.raises(httpx.RemoteProtocolError):
            await anext(pieces)
        await response.aclose()
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(server.url + "/x", content=b"{}")


async def test_connect_error_read_timeout_and_garbage():
    async def silent(n, reader, writer):
        await asyncio.Event().wait()

    async def garbage(n, reader, writer):
        writer.write(b"this is not HTTP\r\n\r\n")
        return "close"

    transport = AsyncioHTTPTransport()
    async with ProxyClient(transport=transport) as client:
        async with ScriptedServer(silent).running() as server:
            url = server.url
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url + "/x", content=b"{}", timeout=httpx.Timeout(5.0, read=0.2))
        with pytest.raises(httpx.ConnectError):
            await client.post(url + "/x", content=b"{}")
        async with ScriptedServer(garbage).running() as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(server.url + "/x", content=b"{}")
