"""The router's OpenAI-compatible HTTP app (same endpoints, API-key handling and error shapes as ``tandem serve``)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tandem.router.config import RouterConfig
from tandem.router.errors import RequestError, error_body
from tandem.router.metrics import RouterMetrics
from tandem.router.service import CHAT, COMPLETIONS, MESSAGES, RouterService
from tandem.router.tokenizer import PromptTokenizer
from tandem.router.workers import Pool, Worker
from tandem.web.auth import UNAUTHORIZED, APIKeys
from tandem.web.errors import is_anthropic_path

logger = logging.getLogger(__name__)


def load_tokenizer(config: RouterConfig) -> PromptTokenizer | None:
    """The model's tokenizer: ``tokenizer_dir`` if given, else the engine's model files for ``model``."""
    if config.tokenizer_dir:
        return PromptTokenizer(config.tokenizer_dir)
    if config.model:
        from tandem.router.tokenizer import load_model_tokenizer

        return load_model_tokenizer(config.model)
    logger.warning("no --model or tokenizer given: routing without prefix awareness")
    return None


# Answered by any one healthy worker, unchanged: they depend on the model only, not on a worker's cache.
FORWARDED = ("/tokenize", "/detokenize", "/v1/messages/count_tokens")


def _any_worker(service: RouterService) -> Worker | None:
    """A healthy worker for a prompt-only request: our engine first, serving pools before prefill ones."""
    workers = [w for w in service.datastore.workers.values() if w.healthy]
    workers.sort(key=lambda w: (w.kind != "tandem", w.pool == Pool.PREFILL))
    return workers[0] if workers else None


class RouterApp(FastAPI):
    """FastAPI for everything but the two proxied endpoints, which skip its middleware stack (see ``__call__``)."""

    hot_paths: dict[str, Any]  # path -> ASGI handler for POSTs to it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # NOTE: POSTs to the completion endpoints go straight to their handler: Starlette's and FastAPI's
        # middleware (server errors, exceptions, body limit, telemetry, exit stack) plus routing were a large
        # share of the router's CPU per proxied request. The handler does its own error handling (below).
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.hot_paths.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _ProxyEndpoint:
    """One proxied endpoint as an ASGI app (an object, so that Starlette's ``Route`` passes it scope, receive
    and send rather than a ``Request``)."""

    def __init__(self, endpoint: str, handler: Any) -> None:
        self.endpoint = endpoint
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(self.endpoint, scope, receive, send)


def build_app(config: RouterConfig, tokenizer: PromptTokenizer | None = None) -> FastAPI:
    """Build the router app. The service starts (health checks, KV-event consumers) in the app's lifespan."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config)
    metrics = RouterMetrics()
    service = RouterService(config, tokenizer, metrics)
    api_keys = APIKeys(config.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = RouterApp(title="Tandem router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics

    def check_auth(authorization: str | None, x_api_key: str | None = None) -> None:
        """The shared API-key check (``Authorization: Bearer`` or ``x-api-key``); 401 when it fails."""
        if not api_keys.authorized(authorization, x_api_key):
            raise RequestError(401, UNAUTHORIZED, code="invalid_api_key")

    async def proxy(endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        """One proxied request as a bare ASGI handler: headers straight from the scope, body from ``receive``."""
        request_id = authorization = x_api_key = None
        for name, value in scope["headers"]:  # lower-cased names (ASGI); the first of repeated ones counts
            if name == b"x-request-id" and request_id is None:
                request_id = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-api-key" and x_api_key is None:
                x_api_key = value.decode("latin-1")
        # NOTE: 32 random hex digits like uuid4().hex, without building a UUID object for every request.
        headers = {"x-request-id": request_id or os.urandom(16).hex()}
        for name, value in scope["headers"]:  # a caller's trace continues through the router (tandem.tracing)
            if name == b"traceparent":
                headers["traceparent"] = value.decode("latin-1")
        if authorization is not None:
            headers["authorization"] = authorization
        elif x_api_key is not None:  # Anthropic clients' header, passed on as the workers' Bearer key
            headers["authorization"] = f"Bearer {x_api_key}"
        response: Response | None = None
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            try:
                check_auth(authorization, x_api_key)
            except RequestError as exc:
                metrics.requests.labels("none", "none", "unauthorized").inc()
                response = exc.response(headers={"x-request-id": headers["x-request-id"]},
                                        anthropic=endpoint == MESSAGES)
            else:
                chunks = []
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its whole request
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                response = await service.handle(endpoint, body, headers)
            await response(scope, receive, tracking_send)
        except Exception:
            # What FastAPI's error middleware did for these routes: log, and answer 500 if nothing was sent yet.
            logger.exception("router error on %s", scope["path"])
            if not started:
                err = RequestError(500, "internal router error", code="router_error")
                await err.response(anthropic=endpoint == MESSAGES)(scope, receive, send)

    app.hot_paths = {endpoint: _ProxyEndpoint(endpoint, proxy) for endpoint in (COMPLETIONS, CHAT, MESSAGES)}
    # Also registered as routes, so that other methods on these paths get FastAPI's 405 (and the same handler
    # serves them if a request ever reaches the router through the stack, e.g. under a mounted root path).
    for endpoint, handler in app.hot_paths.items():
        app.router.routes.append(Route(endpoint, handler, methods=["POST"]))

    async def forward(request: Request) -> Response:
        """Requests about the prompt only (tokenize, detokenize, count_tokens) go to one healthy worker as they are."""
        anthropic = is_anthropic_path(request.url.path)
        try:
            check_auth(request.headers.get("authorization"), request.headers.get("x-api-key"))
            worker = _any_worker(service)
            if worker is None:
                raise RequestError(503, "no healthy worker serves this model", code="no_healthy_worker")
            headers = {"content-type": "application/json",
                       "x-request-id": request.headers.get("x-request-id") or os.urandom(16).hex()}
            key = request.headers.get("authorization") or (
                f"Bearer {request.headers['x-api-key']}" if "x-api-key" in request.headers else None)
            if key is not None:
                headers["authorization"] = key
            try:
                upstream = await service.client.post(worker.url + request.url.path, content=await request.body(),
                                                     headers=headers)
            except httpx.TransportError as exc:
                raise RequestError(502, f"the worker failed: {type(exc).__name__}", code="upstream_error") from exc
        except RequestError as exc:
            return exc.response(anthropic=anthropic)
        return Response(upstream.content, upstream.status_code, headers={
            "content-type": upstream.headers.get("content-type", "application/json"),
            "x-request-id": headers["x-request-id"]})

    for path in FORWARDED:
        app.router.routes.append(Route(path, forward, methods=["POST"]))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_auth(request.headers.get("authorization"), request.headers.get("x-api-key"))
        except RequestError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "tandem",
            "root": config.model or config.served_model_name}]})

    @app.get("/health")
    async def health() -> Response:
        workers = [{"url": w.url, "pool": w.pool.value, "healthy": w.healthy, "inflight": w.inflight}
                   for w in service.datastore.workers.values()]
        redis = None if service.redis_consumer is None else service.redis_consumer.connected
        ready = service.ready()
        return JSONResponse({"status": "ok" if ready else "unavailable", "workers": workers,
                             "redis_index_connected": redis}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error",
                                       None, None), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("router error on %s", request.url.path)
        return JSONResponse(error_body("internal router error", "server_error", None, "router_error"), status_code=500)

    return app
