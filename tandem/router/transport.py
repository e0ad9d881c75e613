"""An httpx transport for the proxy hop that runs httpcore straight on asyncio streams.

httpx's default transport goes through anyio, which wraps every socket read and write in cancel scopes and
probes every idle pooled connection with a ``select`` call per request; at thousands of requests a second that
is most of the router's CPU time. This transport keeps httpx's API (requests, streaming responses, timeouts,
errors) and httpcore's HTTP/1.1 connection pool, and swaps only the network layer for plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import socket
import typing

import httpcore
import httpx

_READ_LIMIT = 1 << 20


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP connection as httpcore sees it, on an asyncio reader/writer pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            if self._writer.transport.get_write_buffer_size() > 65536:  # only wait when the peer is slow
                async with asyncio.timeout(timeout):
                    await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except (OSError, RuntimeError) as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(self, ssl_context: typing.Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS is not supported by the asyncio proxy transport (workers speak plain HTTP)")

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # An idle keep-alive connection with bytes or EOF waiting has been closed (or broken) by the server;
            # the reader already knows, without a syscall.
            return self._reader.at_eof() or bool(self._reader._buffer)  # noqa: SLF001 (no public accessor)
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info in ("client_addr", "server_addr"):
            return self._writer.get_extra_info("sockname" if info == "client_addr" else "peername")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections with asyncio (TCP_NODELAY: small SSE events must not wait for Nagle)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: typing.Iterable | None = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=_READ_LIMIT)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


_ERRORS: dict[type[Exception], type[httpx.HTTPError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout, httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout, httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.ConnectError: httpx.ConnectError, httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError, httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError, httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.NetworkError: httpx.NetworkError, httpcore.TimeoutException: httpx.TimeoutException,
}


def _map_error(exc: Exception, request: httpx.Request) -> httpx.HTTPError:
    for core_type, httpx_type in _ERRORS.items():
        if isinstance(exc, core_type):
            return httpx_type(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> typing.AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except httpcore.TimeoutException as exc:  # httpcore errors become httpx errors, as with httpx's transport
            raise _map_error(exc, self._request) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _map_error(exc, self._request) from exc

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class AsyncioHTTPTransport(httpx.AsyncBaseTransport):
    """httpx transport: httpcore's HTTP/1.1 pool on :class:`AsyncioBackend`."""

    def __init__(self, max_keepalive_connections: int = 256, keepalive_expiry_s: float = 4.0) -> None:
        # NOTE: idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them on the worker's
        # side; reusing one at the moment the worker closes it fails the request ("server disconnected").
        self._pool = httpcore.AsyncConnectionPool(max_connections=None, max_keepalive_connections=max_keepalive_connections,
                                                  keepalive_expiry=keepalive_expiry_s, network_backend=AsyncioBackend())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core_request)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _map_error(exc, request) from exc
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_ResponseStream(response.stream, request), extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
