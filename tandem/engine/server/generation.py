"""What every generation API shares: submitting prompts, collecting or streaming their deltas, metrics,
client disconnects and stream framing. The per-API modules (``serving_*``) shape requests and responses."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tandem.engine.async_engine import EngineDeadError
from tandem.engine.outputs import RequestDelta
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.server.metrics import ServerMetrics
from tandem.engine.server.state import ServerState, now
from tandem.protocol.errors import APIError, from_value_error
from tandem.protocol.kv_transfer import KVTransferParams
from tandem.web.errors import sse_event

logger = logging.getLogger(__name__)


class RequestTracker:
    """Per-request timing for metrics: TTFT, ITL, E2E, queue time, token counts, outcome."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = time.monotonic()
        self.last: float | None = None
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.expected = 0  # samples submitted
        self.finished = 0
        self._done = False

    def on_delta(self, delta: RequestDelta) -> None:
        now_s = time.monotonic()
        label = self.m.model_name
        n = len(delta.new_token_ids)
        if n:
            if self.last is None:
                self.m.ttft.labels(label).observe(now_s - self.start)
            else:
                self.m.itl.labels(label).observe(now_s - self.last)
            self.last = now_s
            self.output_tokens += n
            self.m.generation_tokens.labels(label).inc(n)
        for seconds, histogram in ((delta.queue_time, self.m.queue_time), (delta.prefill_time, self.m.prefill_time),
                                   (delta.decode_time, self.m.decode_time),
                                   (delta.inference_time, self.m.inference_time)):
            if seconds is not None:
                histogram.labels(label).observe(seconds)
        if delta.finished:
            self.finished += 1
            self.m.request_success.labels(label, delta.finish_reason or "stop").inc()

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens += num_tokens
        self.m.prompt_tokens.labels(self.m.model_name).inc(num_tokens)
        self.m.prompt_tokens_hist.labels(self.m.model_name).observe(num_tokens)

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        label = self.m.model_name
        if self.finished < self.expected:  # the client went away (or the engine failed): aborted
            self.m.request_success.labels(label, "abort").inc(self.expected - self.finished)
        self.m.e2e.labels(label).observe(time.monotonic() - self.start)
        self.m.generation_tokens_hist.labels(label).observe(self.output_tokens)


async def merge_streams(streams: list[AsyncIterator[RequestDelta]]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """Interleave several prompts' delta streams as they arrive: yields (prompt index, delta)."""
    if len(streams) == 1:
        try:
            async for d in streams[0]:
                yield 0, d
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]  # aborts the request if unfinished
        return
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int, stream: AsyncIterator[RequestDelta]) -> None:
        try:
            async for d in stream:
                await queue.put((i, d))
        except BaseException as exc:  # surfaced to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done_marker))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done_marker:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]


async def until_disconnect(request: Request, coro):
    """Run ``coro``; if the client goes away first, cancel it (which aborts the engine request)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def raise_delta_error(delta: RequestDelta) -> None:
    """A delta carrying ``error`` ends its request: the engine could not load its KV from the prefill worker
    (``--kv-load-failure-policy fail``), an upstream failure, hence 502."""
    if delta.error is not None:
        raise APIError(502, delta.error, code="kv_transfer_failed")


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


class GenContext:
    """One HTTP request's generation: ids, the model name, kv_transfer_params, and its metrics tracker."""

    def __init__(self, state: ServerState, request: Request, model: str, kv_params: KVTransferParams | None,
                 request_id: str | None) -> None:
        self.state = state
        self.model = model
        self.kv_params = kv_params
        base = request_id or request.state.request_id
        self.request_id = base
        self.response_id = base
        self.created = now()
        self.tracker = RequestTracker(state.metrics)

    def engine_id(self, prompt_index: int, num_prompts: int) -> str:
        rid = self.request_id if num_prompts == 1 else f"{self.request_id}-p{prompt_index}"
        engine = self.state.engine.engine
        if engine is not None and engine.is_active(rid):
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"  # a reused client request id must not collide
        return rid

    def streams(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[AsyncIterator[RequestDelta]]:
        """Submit every prompt; their delta streams, in prompt order."""
        streams = []
        for i, (ids, p) in enumerate(zip(prompt_ids, params)):
            self.tracker.on_prompt(len(ids))
            self.tracker.expected += p.n
            # NOTE: typed, as parsed at the edge; the engine does not parse it again.
            streams.append(self.state.engine.generate(self.engine_id(i, len(prompt_ids)), ids, p, self.kv_params))
        return streams


@dataclass(slots=True)
class Choice:
    """One sample's collected output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass(slots=True)
class Collected:
    """A whole (non-streamed) response's outputs, by (prompt index, sample index)."""

    choices: dict[tuple[int, int], Choice]
    cached_tokens: int = 0
    prompt_logprobs: dict[int, list] = field(default_factory=dict)
    kv_transfer_params: dict | None = None


async def collect(ctx: GenContext, prompt_ids, params) -> Collected:
    """Run the prompts to the end and gather their outputs."""
    out = Collected({(i, j): Choice() for i, p in enumerate(params) for j in range(p.n)})
    try:
        async for i, d in merge_streams(ctx.streams(prompt_ids, params)):
            ctx.tracker.on_delta(d)
            raise_delta_error(d)
            c = out.choices[(i, d.index)]
            c.text += d.new_text
            c.token_ids.extend(d.new_token_ids)
            c.logprobs.extend(d.new_logprobs)
            if d.prompt_logprobs is not None:
                out.prompt_logprobs[i] = d.prompt_logprobs
            if d.finished:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                out.cached_tokens = max(out.cached_tokens, d.num_cached_tokens)
                if d.kv_transfer_params is not None:
                    out.kv_transfer_params = d.kv_transfer_params
    except ValueError as exc:
        raise from_value_error(exc) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from None
    finally:
        ctx.tracker.done()
    for c in out.choices.values():
        if c.finish_reason == "error":
            raise APIError(500, "the engine failed while generating", code="engine_error")
    return out


def stream_error(exc: BaseException) -> APIError:
    """What a failure in the middle of a stream is reported as."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    logger.error("stream failed: %s", exc)
    return APIError(500, "internal server error", code="internal_error")


async def sse_stream(ctx: GenContext, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frame an OpenAI response's SSE events: a failure becomes an error event, and the stream ends with [DONE]."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        raise  # the client went away: closing ``events`` aborts the engine request
    except BaseException as exc:
        yield sse_event(stream_error(exc).body())
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        ctx.tracker.done()
    yield b"data: [DONE]\n\n"
