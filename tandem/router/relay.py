"""Relaying an upstream response to the client, and resuming a stream whose worker fails mid-way.

``RelayResponse`` streams an upstream answer through and always ends it; ``Migration`` continues a single-choice
stream on another worker from the tokens generated so far (the wire contract is in migration.py and
``tandem/protocol/continuation.py``). ``RouterService`` (service.py) builds both.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tandem.router.errors import sse_error_event
from tandem.router.migration import DONE, StreamFailed, StreamState, closing_events, continuation_body
from tandem.router.scheduling import RoutingRequest
from tandem.router.transport import BODY_COMPLETE
from tandem.router.workers import Pool, Worker

if TYPE_CHECKING:
    from tandem.router.service import RouterService

logger = logging.getLogger("tandem.router.service")

# Transport failures that mean "this worker did not serve the request"; safe to retry before any byte is sent.
TRANSPORT_ERRORS = (httpx.TransportError,)


def _never() -> bool:
    return False


class RelayResponse(Response):
    """Streams an upstream response through as it arrives, and always ends it: normally, or with an error event.

    Written as an ASGI callable rather than an async generator so that cleanup (closing the upstream,
    counting the outcome) runs deterministically, also when the client disconnects mid-stream.
    """

    def __init__(self, first_chunk: bytes, upstream: httpx.Response, chunks: AsyncIterator[bytes],
                 headers: dict[str, str], on_done: Callable[[str | None], None],
                 migration: "Migration | None" = None) -> None:
        self.status_code = upstream.status_code
        self.background = None
        self._first_chunk = first_chunk
        self._upstream = upstream
        self._chunks = chunks
        self._on_done = on_done
        self._migration = migration
        self._ending = False  # the last message is being sent: the disconnect watcher may fire, harmlessly
        self._disconnected = False
        self._finished = False
        self._relay_task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        # NOTE: raw headers built directly (no Starlette header merging): this runs once per proxied stream.
        self.raw_headers = [*((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
                            (b"content-type", upstream.headers.get("content-type", "text/event-stream").encode("latin-1")),
                            (b"cache-control", b"no-cache")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # NOTE: the relay runs in the request's own task. A disconnect watcher (a task of its own, which
        # interrupts the relay by cancelling it) is only started once the relay has to wait for the upstream:
        # an answer that arrived whole is relayed without any extra task.
        outcome = "client_disconnected"
        try:
            outcome = await self._relay(receive, send)
        except asyncio.CancelledError:
            # Our own cancel (the client went away) ends the stream quietly; anyone else's propagates.
            if not self._disconnected or self._relay_task.uncancel() > 0:
                raise
        finally:
            self._finished = True
            if self._watch is not None:
                self._watch.cancel()
            await self._upstream.aclose()
            self._on_done(outcome)
            if self._migration is not None and self._migration.on_finish is not None:
                self._migration.on_finish()

    def _watch_disconnect(self, receive: Receive) -> None:
        """Start the disconnect watcher (called from the relay, in the request's task)."""
        if self._watch is None:
            self._relay_task = asyncio.current_task()
            self._watch = asyncio.ensure_future(self._wait_disconnect(receive))
            self._watch.add_done_callback(self._client_gone)

    def _client_gone(self, watch: asyncio.Future) -> None:
        if watch.cancelled() or watch.exception() is not None or self._ending or self._finished or self._disconnected:
            return
        self._disconnected = True
        self._relay_task.cancel()

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        message = await receive()
        while message["type"] != "http.disconnect":  # drain until the client goes away
            message = await receive()

    async def _relay(self, receive: Receive, send: Send) -> str:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self._migration is not None:
            return await self._relay_migrating(receive, send)
        # NOTE: a piece after which the upstream body is known complete goes out as the end of the response
        # too (one write to the client instead of two: the data, then the empty last chunk).
        upstream_complete = self._upstream.extensions.get(BODY_COMPLETE, _never)
        last = self._first_chunk
        ended = False
        if last:
            ended = await self._send_piece(send, last, upstream_complete())
        if not upstream_complete():
            self._watch_disconnect(receive)
        outcome = "ok"
        try:
            async for chunk in self._chunks:
                if chunk:
                    last = chunk
                    ended = await self._send_piece(send, chunk, upstream_complete())
        except TRANSPORT_ERRORS as exc:
            logger.warning("upstream %s failed mid-stream: %s", self._upstream.request.url, exc)
            # Close a half-written event first so the error event parses on its own.
            prefix = b"" if last.endswith(b"\n\n") or not last else b"\n\n"
            error = sse_error_event(f"the worker failed mid-stream: {type(exc).__name__}", "upstream_stream_error")
            await send({"type": "http.response.body", "body": prefix + error, "more_body": True})
            outcome = "stream_error"
        if not ended:
            await self._send_piece(send, b"", True)
        return outcome

    async def _relay_migrating(self, receive: Receive, send: Send) -> str:
        """Relay event by event (token ids stripped, the stream state kept); a failed upstream is replaced by a
        continuation on another worker, seamlessly for the client."""
        migration = self._migration
        state = migration.state
        self._watch_disconnect(receive)
        pending = self._first_chunk
        while True:
            try:
                await self._forward(send, state.feed(pending))
                while not state.done:
                    async with asyncio.timeout(migration.stall_timeout_s):
                        chunk = await anext(self._chunks, None)
                    if chunk is None:
                        raise StreamFailed("eof", "the stream ended before [DONE]")
                    await self._forward(send, state.feed(chunk))
                break
            except (*TRANSPORT_ERRORS, StreamFailed, TimeoutError) as exc:
                failure = stream_failure(exc, migration.stall_timeout_s)
            await self._upstream.aclose()
            resumed = await migration.resume(failure, self._on_done)
            if isinstance(resumed, bytes):  # the request was complete, or cannot be resumed: end the stream
                await self._forward(send, resumed)
                break
            pending, self._upstream, self._chunks, self._on_done = resumed
        await self._send_piece(send, b"", True)
        return "ok" if state.done and not migration.gave_up else "stream_error"

    async def _forward(self, send: Send, body: bytes) -> None:
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _send_piece(self, send: Send, body: bytes, last: bool) -> bool:
        if last:
            # uvicorn reports the end of the response to receive() as a disconnect: not the client going away.
            self._ending = True
        await send({"type": "http.response.body", "body": body, "more_body": not last})
        return last


def stream_failure(exc: BaseException, stall_timeout_s: float) -> StreamFailed:
    """Name a mid-stream failure by the migration metric's reasons."""
    if isinstance(exc, StreamFailed):
        return exc
    if isinstance(exc, TimeoutError):
        return StreamFailed("stall", f"no data for {stall_timeout_s:g} s")
    return StreamFailed("connection_error", f"{type(exc).__name__}: {exc}")


# What a successful continuation hands the relay: its first bytes, upstream, chunk iterator and release callback.
_Resumed = tuple[bytes, httpx.Response, AsyncIterator[bytes], Callable[[str | None], None]]


class Migration:
    """Resumes one relayed single-choice stream on another worker when its upstream fails (see migration.py)."""

    def __init__(self, service: "RouterService", pool: Pool, request: RoutingRequest, endpoint: str,
                 body: dict[str, Any], headers: dict[str, str], state: StreamState,
                 done: Callable[[str, str, str], None]) -> None:
        self.service = service
        self.pool = pool
        self.request = request
        self.endpoint = endpoint
        self.body = body
        self.headers = headers
        self.state = state
        self.done = done
        self.worker: Worker | None = None
        self.on_finish: Callable[[], None] | None = None  # called once the relay ends (tenant token accounting)
        self.failed: set[str] = set()
        self.gave_up = False
        self.stall_timeout_s = service.config.stream_stall_timeout_s
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    async def resume(self, failure: StreamFailed, release: Callable[[str | None], None]) -> _Resumed | bytes:
        """Continue the request on another worker, or return the bytes that end the stream."""
        service, state = self.service, self.state
        worker = self.worker
        release(None)  # the failed worker no longer holds this request
        request_id = self.headers["x-request-id"]
        if worker is not None:
            self.failed.add(worker.url)
            service.datastore.mark_failed(worker, f"mid-stream: {failure.detail}")
        if state.finish_reason is not None:
            logger.info("request %s: upstream %s failed after the last token (%s); ending the stream",
                        request_id, worker and worker.url, failure)
            return closing_events(state, self.include_usage)
        why = self._cannot_resume()
        if why is not None:
            return self._give_up(f"the worker failed mid-stream ({failure.reason}) and {why}")
        body = continuation_body(self.body, state)
        if body is None:  # every token was generated: only the finish chunk was missing
            return state.finish_chunk("length") + closing_events(state, self.include_usage)
        payload = json.dumps(body).encode()
        service.metrics.migrations.labels(failure.reason).inc()
        while True:
            pick = service.profiles[self.pool].pick(self.request, service.datastore.pool(self.pool), exclude=self.failed)
            if pick is None:
                return self._give_up(f"the worker failed mid-stream ({failure.reason}) and no other worker is healthy")
            target = pick.worker
            logger.warning("request %s: migrating from %s to %s after %s (%d tokens generated, migration %d of %d)",
                           request_id, worker and worker.url, target.url, failure, len(state.token_ids),
                           state.migrations + 1, service.config.max_migrations)
            resumed = await self._open(target, payload)
            if resumed is not None:
                state.begin_continuation()
                self.worker = target
                return resumed
            self.failed.add(target.url)

    def _cannot_resume(self) -> str | None:
        state = self.state
        if state.migrations >= self.service.config.max_migrations:
            return f"--max-migrations={self.service.config.max_migrations} was reached"
        if state.prompt_token_ids is None:
            return "its prompt's token ids are unknown"
        if state.untracked:
            return "the worker did not return token ids"
        return None

    def _give_up(self, message: str) -> bytes:
        self.gave_up = True
        logger.warning("request %s: %s", self.headers["x-request-id"], message)
        self.state.done = True
        return sse_error_event(message, "upstream_stream_error") + DONE

    async def _open(self, worker: Worker, payload: bytes) -> _Resumed | None:
        relayed = False

        def done_once_relayed(pool: str, url: str, outcome: str) -> None:
            if relayed:  # a continuation refused outright is not the request's outcome
                self.done(pool, url, outcome)

        result = await self.service._attempt(self.pool, worker, self.endpoint, payload, True, self.headers,
                                             done_once_relayed)
        if isinstance(result, RelayResponse) and result.status_code == 200:
            relayed = True
            return result._first_chunk, result._upstream, result._chunks, result._on_done
        if isinstance(result, Response):
            logger.warning("request %s: continuation on %s answered %d: %s", self.headers["x-request-id"],
                           worker.url, result.status_code, bytes(result.body)[:300])
        return None
