"""The HTTP face of one engine (shared by serve, prefill and decode roles): its routes.

The OpenAI and Anthropic APIs are served by the per-API modules (``serving_completions``, ``serving_chat``,
``serving_messages``, ``serving_tokenize``) on the machinery in ``generation``; this module wires routes,
middleware, error handlers and the engine's lifecycle.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import tandem
from tandem.engine.server.serving_chat import serve_chat
from tandem.engine.server.serving_completions import serve_completion
from tandem.engine.server.serving_messages import count_tokens, serve_messages
from tandem.engine.server.serving_tokenize import detokenize, tokenize
from tandem.engine.server.state import ServerConfig, ServerState, now
from tandem.protocol.anthropic import CountTokensRequest, MessagesRequest
from tandem.protocol.errors import APIError, from_validation_errors
from tandem.protocol.openai import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tandem.tracing import TracingMiddleware, setup_tracing
from tandem.web.auth import APIKeys, RequestContextMiddleware
from tandem.web.errors import error_response, is_anthropic_path

__all__ = ["ServerConfig", "ServerState", "build_app"]

logger = logging.getLogger(__name__)


async def _watch_engine_start(state: ServerState) -> None:
    """Wait for the engine's start-up; if it failed, log why and hand the error to ``on_engine_start_failure``."""
    assert state.engine.ready is not None  # start() made it
    await state.engine.ready.wait()  # set once start-up ends, failed or not (wait_ready would raise on failure)
    error = state.engine.error
    if error is not None and state.on_engine_start_failure is not None:
        logger.error("engine failed to start, shutting the server down: %s", error)
        state.on_engine_start_failure(error)


def build_app(state: ServerState) -> FastAPI:
    """The engine server's app: the routes below plus each extension's."""

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
    if setup_tracing(f"tandem-{state.config.role}"):  # OTEL_* variables; off by default
        app.add_middleware(TracingMiddleware, role=state.config.role)
    app.add_middleware(RequestContextMiddleware, keys=APIKeys(state.config.api_keys),
                       on_unauthorized=lambda: state.metrics.request_errors.labels(state.config.model_name,
                                                                                   "401").inc())
    _add_error_handlers(app, state)
    _add_operational_routes(app, state)
    _add_api_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    def respond(request: Request, err: APIError):
        return error_response(err, anthropic=is_anthropic_path(request.url.path))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.request_errors.labels(state.config.model_name, str(exc.status)).inc()
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        state.metrics.request_errors.labels(state.config.model_name, "400").inc()
        return respond(request, from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return respond(request, APIError(exc.status_code, str(exc.detail),
                                         code="not_found" if exc.status_code == 404 else None,
                                         type_="invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return respond(request, APIError(500, "internal server error", code="internal_error"))


def _add_operational_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.engine.error is not None:
            return error_response(APIError(503, f"engine failed: {state.engine.error}", code="engine_dead"))
        if not state.engine.is_ready:
            return error_response(APIError(503, "loading model", code="model_loading"))
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
            {"id": name, "object": "model", "created": now(), "owned_by": "tandem", "root": state.config.model_name,
             "max_model_len": state.max_model_len}
            for name in state.config.served_model_names]}

    @app.get("/kv_events/stream")
    async def kv_events():
        return StreamingResponse(state.kv_hub.ndjson_stream(), media_type="application/x-ndjson")


def _add_api_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        return tokenize(state, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest):
        return detokenize(state, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serve_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serve_chat(state, body, request)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        return await serve_messages(state, body, request)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(body: CountTokensRequest):
        return count_tokens(state, body)
