"""The OpenAI-compatible HTTP face of one engine (shared by serve, prefill and decode roles)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import tandem
from tandem.engine.async_engine import AsyncEngine, EngineDeadError
from tandem.engine.outputs import RequestDelta
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.server.errors import APIError, from_validation_errors, from_value_error
from tandem.engine.server.kv_events_pub import KVEventHub, RedisKVEventPublisher
from tandem.engine.server.metrics import ServerMetrics
from tandem.engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

logger = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_waiting_requests: int | None = None
    advertise_url: str = "http://127.0.0.1:8000"
    kv_events_redis: str | None = None
    role: str = "aggregated"  # "aggregated" | "prefill" | "decode"

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class ServerState:
    """Everything the routes need: the engine, config, metrics and the KV-event hub."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(config.model_name, lambda: engine.stats)
        self.kv_hub = KVEventHub(config.advertise_url, config.model_name, engine.config.cache.block_size)
        self.redis_publisher = RedisKVEventPublisher(self.kv_hub, config.kv_events_redis) \
            if config.kv_events_redis else None
        self.engine.kv_event_listeners.append(self.kv_hub.publish_threadsafe)
        # Extra routes/hooks for worker roles (disaggregation) register here.
        self.extensions: list[Any] = []
        # Called once if the engine fails to start (e.g. ``tandem serve`` stops its server and exits 1); without
        # it the app stays up and answers 503 with the reason.
        self.on_engine_start_failure: Callable[[BaseException], None] | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler.max_model_len


def _now() -> int:
    return int(time.time())


# ---- helpers ---------------------------------------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> str:
    names = state.config.served_model_names
    if model is None or model == "":
        return names[0]
    if model not in names:
        raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(names)}",
                       param="model", code="model_not_found")
    return model


def _check_ready(state: ServerState) -> None:
    if state.engine.error is not None:
        raise APIError(503, f"engine failed to start: {state.engine.error}", code="engine_dead")
    if not state.engine.is_ready:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
    limit = state.config.max_waiting_requests
    stats = state.engine.stats
    if limit is not None and stats is not None and stats.num_waiting >= limit:
        raise APIError(503, f"server overloaded: {stats.num_waiting} requests already waiting (limit {limit})",
                       code="queue_full")


def _check_length(state: ServerState, prompt_len: int, params: SamplingParams, param: str) -> None:
    limit = state.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                            f"{prompt_len} tokens, leaving no room for output.", param=param,
                       code="context_length_exceeded")
    if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the {param}, "
                            f"{params.max_tokens} in the completion).", param="max_tokens",
                       code="context_length_exceeded")


def _engine(state: ServerState):
    engine = state.engine.engine
    assert engine is not None
    return engine


def _token_text(state: ServerState, token_id: int) -> str:
    tok = _engine(state).tokenizer
    return tok.decode([token_id]) if tok is not None else str(token_id)


class _RequestTracker:
    """Per-request timing for metrics: TTFT, ITL, E2E, queue time, token counts, outcome."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = time.monotonic()
        self.last: float | None = None
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.expected = 0  # samples submitted
        self.finished = 0

    def on_delta(self, delta: RequestDelta) -> None:
        now = time.monotonic()
        label = self.m.model_name
        n = len(delta.new_token_ids)
        if n:
            if self.last is None:
                self.m.ttft.labels(label).observe(now - self.start)
            else:
                self.m.itl.labels(label).observe(now - self.last)
            self.last = now
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
        label = self.m.model_name
        if self.finished < self.expected:  # the client went away (or the engine failed): aborted
            self.m.request_success.labels(label, "abort").inc(self.expected - self.finished)
        self.m.e2e.labels(label).observe(time.monotonic() - self.start)
        self.m.generation_tokens_hist.labels(label).observe(self.output_tokens)


async def _merge_streams(streams: list[AsyncIterator[RequestDelta]]) -> AsyncIterator[tuple[int, RequestDelta]]:
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


async def _until_disconnect(request: Request, coro):
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


def _raise_delta_error(delta: RequestDelta) -> None:
    """A delta carrying ``error`` ends its request: the engine could not load its KV from the prefill worker
    (``--kv-load-failure-policy fail``), an upstream failure, hence 502."""
    if delta.error is not None:
        raise APIError(502, delta.error, code="kv_transfer_failed")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- the app ---------------------------------------------------------------------------------------
class RequestContextMiddleware:
    """Request ids and API-key checks, as plain ASGI.

    NOTE: not Starlette's BaseHTTPMiddleware, which hides client disconnects from the handlers
    (and so would keep generating for clients that are gone).
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        keys = self.state.config.api_keys
        if keys and scope["path"].startswith(PROTECTED_PREFIXES):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else ""
            # Compare against every key, in constant time, without short-circuiting.
            ok = False
            for key in keys:
                ok |= hmac.compare_digest(token.encode(), key.encode())
            if not ok:
                self.state.metrics.request_errors.labels(self.state.config.model_name, "401").inc()
                response = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key").response({"x-request-id": request_id})
                await response(scope, receive, send)
                return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


async def _watch_engine_start(state: ServerState) -> None:
    """Wait for the engine's start-up; if it failed, log why and hand the error to ``on_engine_start_failure``."""
    assert state.engine.ready is not None  # start() made it
    await state.engine.ready.wait()  # set once start-up ends, failed or not (wait_ready would raise on failure)
    error = state.engine.error
    if error is not None and state.on_engine_start_failure is not None:
        logger.error("engine failed to start, shutting the server down: %s", error)
        state.on_engine_start_failure(error)


def build_app(state: ServerState) -> FastAPI:
    async def lifespan(app: FastAPI):
        state.kv_hub.bind(asyncio.get_running_loop())
        state.engine.start()
        watcher = asyncio.create_task(_watch_engine_start(state))
        if state.redis_publisher is not None:
            state.redis_publisher.start()
        for ext in state.extensions:
            await ext.startup(state)
        try:
            yield
        finally:
            watcher.cancel()
            for ext in reversed(state.extensions):
                await ext.shutdown(state)
            if state.redis_publisher is not None:
                await state.redis_publisher.stop()
            await asyncio.get_running_loop().run_in_executor(None, state.engine.shutdown)

    app = FastAPI(title="Tandem engine", version=tandem.__version__, lifespan=lifespan)
    app.state.tandem = state

    app.add_middleware(RequestContextMiddleware, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.request_errors.labels(state.config.model_name, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = from_validation_errors(list(exc.errors()))
        state.metrics.request_errors.labels(state.config.model_name, "400").inc()
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        type_="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return APIError(500, "internal server error", code="internal_error").response()

    # ---- operational endpoints ---------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.engine.error is not None:
            return APIError(503, f"engine failed: {state.engine.error}", code="engine_dead").response()
        if not state.engine.is_ready:
            return APIError(503, "loading model", code="model_loading").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": tandem.__version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": _now(), "owned_by": "tandem", "root": state.config.model_name,
             "max_model_len": state.max_model_len}
            for name in state.config.served_model_names]}

    @app.get("/kv_events/stream")
    async def kv_events():
        return StreamingResponse(state.kv_hub.ndjson_stream(), media_type="application/x-ndjson")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        _check_ready(state)
        engine = _engine(state)
        try:
            if body.messages is not None:
                ids = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                                 body.add_generation_prompt)
            elif body.prompt is not None:
                ids = engine.tokenize(body.prompt, body.add_special_tokens)
            else:
                raise APIError(400, "prompt: give either prompt or messages", param="prompt")
        except ValueError as exc:
            raise from_value_error(exc) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        _check_ready(state)
        engine = _engine(state)
        vocab = engine.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens) if engine.tokenizer else ""}

    # ---- generation --------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = _check_model(state, body.model)
        _check_ready(state)
        engine = _engine(state)
        prompts = _completion_prompts(body)
        try:
            prompt_ids = [p if isinstance(p, list) else engine.tokenize(p, body.add_special_tokens) for p in prompts]
            if any(not ids for ids in prompt_ids):
                raise APIError(400, "prompt: must not be empty", param="prompt")
            params = [body.to_sampling_params(state.max_model_len, len(ids)) for ids in prompt_ids]
        except ValueError as exc:
            raise from_value_error(exc) from None
        for ids, p in zip(prompt_ids, params):
            _check_length(state, len(ids), p, "prompt")
        if body.echo and params[0].logprobs is not None:
            params = [p.clone(prompt_logprobs=p.logprobs) for p in params]
        ctx = _GenContext(state, request, model, body.kv_transfer_params, body.request_id)
        texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else "" for p in prompts]
        if body.stream:
            return StreamingResponse(_sse_stream(ctx, _stream_completion(ctx, prompt_ids, params, texts, body)),
                                     media_type="text/event-stream")
        result = await _until_disconnect(request, _collect(ctx, prompt_ids, params))
        return _completion_response(ctx, result, prompt_ids, params, texts, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = _check_model(state, body.model)
        _check_ready(state)
        engine = _engine(state)
        try:
            ids = engine.apply_chat_template(
                body.conversation(), body.add_generation_prompt and not body.continue_final_message,
                **({"continue_final_message": True} if body.continue_final_message else {}),
                **(body.chat_template_kwargs or {}),
            )
            params = body.to_sampling_params(state.max_model_len, len(ids))
        except ValueError as exc:
            raise from_value_error(exc) from None
        _check_length(state, len(ids), params, "messages")
        ctx = _GenContext(state, request, model, body.kv_transfer_params, body.request_id)
        if body.stream:
            return StreamingResponse(_sse_stream(ctx, _stream_chat(ctx, ids, params, body)),
                                     media_type="text/event-stream")
        result = await _until_disconnect(request, _collect(ctx, [ids], [params]))
        return _chat_response(ctx, result, ids, params)

    return app


def _completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


class _GenContext:
    def __init__(self, state: ServerState, request: Request, model: str, kv_params: dict | None,
                 request_id: str | None) -> None:
        self.state = state
        self.model = model
        self.kv_params = kv_params
        base = request_id or request.state.request_id
        self.request_id = base
        self.response_id = base
        self.created = _now()
        self.tracker = _RequestTracker(state.metrics)

    def engine_id(self, prompt_index: int, num_prompts: int) -> str:
        rid = self.request_id if num_prompts == 1 else f"{self.request_id}-p{prompt_index}"
        engine = self.state.engine.engine
        if engine is not None and engine.is_active(rid):
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"  # a reused client request id must not collide
        return rid

    def streams(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[AsyncIterator[RequestDelta]]:
        streams = []
        for i, (ids, p) in enumerate(zip(prompt_ids, params)):
            self.tracker.on_prompt(len(ids))
            self.tracker.expected += p.n
            streams.append(self.state.engine.generate(self.engine_id(i, len(prompt_ids)), ids, p, self.kv_params))
        return streams


@dataclass(slots=True)
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass(slots=True)
class _Collected:
    choices: dict[tuple[int, int], _Choice]
    cached_tokens: int = 0
    prompt_logprobs: dict[int, list] = field(default_factory=dict)
    kv_transfer_params: dict | None = None


async def _collect(ctx: _GenContext, prompt_ids, params) -> _Collected:
    out = _Collected({(i, j): _Choice() for i, p in enumerate(params) for j in range(p.n)})
    try:
        async for i, d in _merge_streams(ctx.streams(prompt_ids, params)):
            ctx.tracker.on_delta(d)
            _raise_delta_error(d)
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


def _completion_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]],
                         k: int, text_offset: int, prefix: list | None = None) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    entries = list(prefix or []) + list(zip(token_ids, logprobs))
    for tok, lp in entries:
        s = _token_text(state, tok)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp.get(tok))
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        tops.append({_token_text(state, t): v for t, v in ranked})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict:
    content = []
    for tok, lp in zip(token_ids, logprobs):
        s = _token_text(state, tok)
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        content.append({
            "token": s, "logprob": lp.get(tok), "bytes": list(s.encode()),
            "top_logprobs": [{"token": (t_s := _token_text(state, t)), "logprob": v, "bytes": list(t_s.encode())}
                             for t, v in ranked],
        })
    return {"content": content}


def _completion_response(ctx: _GenContext, result: _Collected, prompt_ids, params, texts, body) -> dict:
    state = ctx.state
    choices = []
    completion_tokens = 0
    for (i, j), c in sorted(result.choices.items()):
        p = params[i]
        text = (texts[i] + c.text) if body.echo else c.text
        lp = None
        if p.logprobs is not None:
            prefix = None
            if body.echo:
                plp = result.prompt_logprobs.get(i) or []
                prefix = list(zip(prompt_ids[i], plp + [None] * (len(prompt_ids[i]) - len(plp))))
            lp = _completion_logprobs(state, c.token_ids, c.logprobs, p.logprobs, 0, prefix)
        completion_tokens += len(c.token_ids)
        choices.append({"index": i * p.n + j, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    resp = {"id": f"cmpl-{ctx.response_id}", "object": "text_completion", "created": ctx.created,
            "model": ctx.model, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens, result.cached_tokens)}
    if result.kv_transfer_params is not None:
        resp["kv_transfer_params"] = result.kv_transfer_params
    return resp


def _chat_response(ctx: _GenContext, result: _Collected, ids: list[int], params: SamplingParams) -> dict:
    choices = []
    completion_tokens = 0
    for (_, j), c in sorted(result.choices.items()):
        completion_tokens += len(c.token_ids)
        choices.append({
            "index": j,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _chat_logprobs(ctx.state, c.token_ids, c.logprobs, params.logprobs or 0)
            if params.logprobs is not None else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        })
    resp = {"id": f"chatcmpl-{ctx.response_id}", "object": "chat.completion", "created": ctx.created,
            "model": ctx.model, "choices": choices,
            "usage": _usage(len(ids), completion_tokens, result.cached_tokens)}
    if result.kv_transfer_params is not None:
        resp["kv_transfer_params"] = result.kv_transfer_params
    return resp


def _stream_error(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        err = exc
    elif isinstance(exc, ValueError):
        err = from_value_error(exc)
    elif isinstance(exc, EngineDeadError):
        err = APIError(503, str(exc), code="engine_unavailable")
    else:
        logger.error("stream failed: %s", exc)
        err = APIError(500, "internal server error", code="internal_error")
    return _sse(err.body())


async def _sse_stream(ctx: _GenContext, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frame a response's SSE events: a failure becomes an error event, and the stream always ends with [DONE]."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        raise  # the client went away: closing ``events`` aborts the engine request
    except BaseException as exc:
        yield _stream_error(exc)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        ctx.tracker.done()
    yield b"data: [DONE]\n\n"


async def _stream_completion(ctx: _GenContext, prompt_ids, params, texts, body) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": f"cmpl-{ctx.response_id}", "object": "text_completion", "created": ctx.created, "model": ctx.model}
    completion_tokens = 0
    cached = 0
    echoed: set[tuple[int, int]] = set()
    offsets: dict[tuple[int, int], int] = {}
    async for i, d in _merge_streams(ctx.streams(prompt_ids, params)):
        ctx.tracker.on_delta(d)
        _raise_delta_error(d)
        p = params[i]
        key = (i, d.index)
        text = d.new_text
        if body.echo and key not in echoed:
            echoed.add(key)
            text = texts[i] + text
        completion_tokens += len(d.new_token_ids)
        lp = None
        if p.logprobs is not None and d.new_token_ids:
            lp = _completion_logprobs(ctx.state, d.new_token_ids, d.new_logprobs, p.logprobs, offsets.get(key, 0))
        offsets[key] = offsets.get(key, 0) + len(text)
        if d.finished:
            cached = max(cached, d.num_cached_tokens)
        if not text and not d.finished and lp is None:
            continue
        chunk = {**base, "choices": [{"index": i * p.n + d.index, "text": text, "logprobs": lp,
                                      "finish_reason": d.finish_reason if d.finished else None,
                                      "stop_reason": d.stop_reason if d.finished else None}]}
        yield _sse(chunk)
    if include_usage:
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens, cached)})


async def _stream_chat(ctx: _GenContext, ids: list[int], params: SamplingParams, body) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": f"chatcmpl-{ctx.response_id}", "object": "chat.completion.chunk", "created": ctx.created,
            "model": ctx.model}
    completion_tokens = 0
    cached = 0
    for j in range(params.n):
        yield _sse({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})
    async for _, d in _merge_streams(ctx.streams([ids], [params])):
        ctx.tracker.on_delta(d)
        _raise_delta_error(d)
        completion_tokens += len(d.new_token_ids)
        if d.finished:
            cached = max(cached, d.num_cached_tokens)
        lp = None
        if params.logprobs is not None and d.new_token_ids:
            lp = _chat_logprobs(ctx.state, d.new_token_ids, d.new_logprobs, params.logprobs)
        if not d.new_text and not d.finished and lp is None:
            continue  # NOTE: text held back (a possible stop string) still sends its tokens' logprobs
        choice = {"index": d.index, "delta": {"content": d.new_text} if d.new_text else {}, "logprobs": lp,
                  "finish_reason": d.finish_reason if d.finished else None}
        if d.finished:
            choice["stop_reason"] = d.stop_reason
        yield _sse({**base, "choices": [choice]})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(len(ids), completion_tokens, cached)})
