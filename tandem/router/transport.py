"""An httpx transport for the proxy hop: HTTP/1.1 keep-alive connections on asyncio protocols, parsed by httptools.

httpx's default transport runs httpcore's pure-Python HTTP/1.1 state machine (h11) on anyio streams: cancel
scopes around every socket call, a ``select`` probe of every idle pooled connection and several layers of
Python per response chunk. At hundreds of proxied requests a second that was most of the router's CPU time.
This transport keeps httpx's API (requests, streaming responses, timeouts, the ``httpx`` error types) and swaps
everything underneath for what uvicorn uses on the server side: an ``asyncio.Protocol`` per connection and the
llhttp parser from ``httptools`` (C). Responses still stream: each read from the socket is handed on as soon
as it is parsed (the bytes of one read in one piece, so a burst of events costs one relay step, not one each).

Scope: plain ``http://`` (the router mounts it for that scheme only; workers speak plain HTTP inside the cluster),
one request per connection at a time, no HEAD requests.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import typing
from typing import Any

import httptools
import httpx

# Response bytes parsed but not yet taken by the reader, above which reading from the socket pauses.
_HIGH_WATER = 1 << 20

# Response extension: a callable, True once the body's last byte has been handed out (the stream then ends
# without waiting on the network), so a relay can send its last piece together with the end of its own response.
BODY_COMPLETE = "tandem.body_complete"


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a worker; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.protocol_error: str | None = None  # the parser's complaint, when the worker's answer was not HTTP
        self.idle_since = 0.0
        self.active = False  # a request is in flight (unsolicited bytes on an idle connection close it)
        self._waiter: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = True
        self.until_eof = True  # no content-length and not chunked: the body ends when the server closes
        self.body: list[bytes] = []
        self.buffered = 0

    # ---- asyncio protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.close()  # the server spoke out of turn: this connection is not safe to reuse
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.protocol_error = f"invalid HTTP response from the worker: {type(exc).__name__}: {exc}"
            self.close()
        if self.buffered > _HIGH_WATER and not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self.until_eof and self.active and self.protocol_error is None:
            self.complete = True
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ---- httptools callbacks ----

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self.until_eof = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # ---- used by the transport ----

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next bytes (or the end) from the server; TimeoutError after ``timeout`` seconds."""
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take_body(self) -> bytes:
        data = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self.buffered = 0
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def failure(self, request: httpx.Request, what: str) -> httpx.HTTPError:
        """The error for a connection that ended before the response did."""
        return httpx.RemoteProtocolError(self.protocol_error or f"the worker closed the connection {what}",
                                         request=request)

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.closed:
            raise httpx.WriteError("the connection to the worker is closed")
        self.transport.write(data)
        if self._writing_paused:  # only wait when the worker reads slowly (the transport's high-water mark)
            self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._drain
            except TimeoutError as exc:
                raise httpx.WriteTimeout("timed out writing the request to the worker") from exc
            finally:
                self._drain = None
            if self.closed:
                raise httpx.WriteError("the worker closed the connection while the request was being sent")

    def begin(self) -> None:
        self._reset()
        self.active = True

    def close(self) -> None:
        self.active = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as it arrives: one piece per socket read. Ends by handing the connection back."""

    def __init__(self, transport: AsyncioHTTPTransport, key: tuple[bytes, int], conn: _Connection,
                 request: httpx.Request, read_timeout: float | None) -> None:
        self._transport = transport
        self._key = key
        self._conn = conn
        self._request = request
        self._read_timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> typing.AsyncIterator[bytes]:
        conn = self._conn
        while not self._done:
            if conn.body:
                yield conn.take_body()
            elif conn.complete:
                self._finish()
            elif conn.closed:
                self._finish()
                raise conn.failure(self._request, "without sending the complete response body")
            else:
                try:
                    await conn.wait(self._read_timeout)
                except TimeoutError as exc:
                    self._finish()
                    raise httpx.ReadTimeout("timed out reading the response from the worker", request=self._request) from exc
                except BaseException:
                    self._finish()
                    raise

    def complete(self) -> bool:
        conn = self._conn
        return self._done or (conn.complete and not conn.body)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._transport._release(self._key, self._conn)

    async def aclose(self) -> None:
        self._finish()


class AsyncioHTTPTransport(httpx.AsyncBaseTransport):
    """httpx transport: a pool of HTTP/1.1 keep-alive connections per worker (most recently used first)."""

    def __init__(self, max_keepalive_connections: int = 512, keepalive_expiry_s: float = 4.0) -> None:
        # NOTE: idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them on the worker's
        # side; reusing one at the moment the worker closes it fails the request ("server disconnected").
        self._max_idle = max_keepalive_connections
        self._expiry_s = keepalive_expiry_s
        self._idle: dict[tuple[bytes, int], collections.deque[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme != b"http":
            raise httpx.UnsupportedProtocol(f"the proxy transport speaks plain http, not {url.scheme!r}", request=request)
        if request.method == "HEAD":
            raise httpx.LocalProtocolError("the proxy transport does not send HEAD requests", request=request)
        timeouts = request.extensions.get("timeout", {})
        read_timeout = timeouts.get("read")
        key = (url.raw_host, url.port or 80)
        conn = self._acquire(key)
        if conn is None:
            conn = await self._connect(key, timeouts.get("connect"), request)
        conn.begin()
        try:
            await self._send(conn, request, timeouts.get("write"))
            while not conn.headers_done:
                if conn.closed:
                    raise conn.failure(request, "without sending a response")
                await conn.wait(read_timeout)
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout("timed out waiting for the worker's response", request=request) from exc
        except OSError as exc:
            conn.close()
            raise httpx.WriteError(str(exc), request=request) from exc
        except BaseException:
            conn.close()
            raise
        body = _ResponseBody(self, key, conn, request, read_timeout)
        return httpx.Response(conn.status, headers=conn.headers, stream=body,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason.strip(),
                                          BODY_COMPLETE: body.complete})

    @staticmethod
    async def _send(conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
        """The request head and body; a body already in memory goes out in the same write as the head."""
        parts = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
        chunked = False
        for name, value in request.headers.raw:
            if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value:
                raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
            parts += (name, b": ", value, b"\r\n")
            chunked = chunked or (name.lower() == b"transfer-encoding" and b"chunked" in value.lower())
        parts.append(b"\r\n")
        if isinstance(request.stream, httpx.ByteStream):  # the body in memory (content= or stream=ByteStream)
            parts += request.stream
            await conn.write(b"".join(parts), timeout)
            return
        await conn.write(b"".join(parts), timeout)
        async for chunk in request.stream:
            if chunk:
                await conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk, timeout)
        if chunked:
            await conn.write(b"0\r\n\r\n", timeout)

    def _acquire(self, key: tuple[bytes, int]) -> _Connection | None:
        """The most recently used idle connection to ``key`` that the worker has not closed, if any."""
        idle = self._idle.get(key)
        if not idle:
            return None
        expired_before = asyncio.get_running_loop().time() - self._expiry_s
        while idle and idle[0].idle_since < expired_before:  # oldest first
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, key: tuple[bytes, int], conn: _Connection) -> None:
        """Back to the pool if the response was read to its end and the connection stays open, else closed."""
        reusable = conn.complete and conn.keep_alive and not conn.closed and not conn.body and not self._closed
        conn.active = False
        if not reusable:
            conn.close()
            return
        idle = self._idle.setdefault(key, collections.deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    @staticmethod
    async def _connect(key: tuple[bytes, int], timeout: float | None, request: httpx.Request) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, conn = await loop.create_connection(lambda: _Connection(loop), key[0].decode("ascii"), key[1])
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {request.url.host}:{key[1]}", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small SSE events must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: what a worker sets must never ride along on another client's request."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Ignore the response's ``Set-Cookie`` headers (httpx calls this after every response)."""

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        """Refuse to store a cookie set through the API as well."""


_NO_COOKIES = _NoCookies()


class ProxyClient(httpx.AsyncClient):
    """The request path's httpx client: without a cookie jar.

    A proxy must not keep cookies: one client's upstream ``Set-Cookie`` would ride along on every other client's
    requests. NOTE: it also saves httpx's per-response cookie extraction (it builds urllib request and response
    stand-ins for every response), one of the larger costs of ``send`` on the router's request path.
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        """httpx's constructor assigns a jar (``cookies=`` included): this client never keeps one."""
