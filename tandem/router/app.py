"""The router's OpenAI-compatible HTTP app (same endpoints, API-key handling and error shapes as ``tandem serve``)."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tandem.router.config import RouterConfig
from tandem.router.errors import RequestError, error_body
from tandem.router.metrics import RouterMetrics
from tandem.router.service import CHAT, COMPLETIONS, RouterService
from tandem.router.tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)


def load_tokenizer(config: RouterConfig) -> PromptTokenizer | None:
    """The model's tokenizer: ``tokenizer_dir`` if given, else the engine's model files for ``model``."""
    if config.tokenizer_dir:
        return PromptTokenizer(config.tokenizer_dir)
    if config.model:
        from tandem.engine.model_files import tokenizer_dir

        return PromptTokenizer(tokenizer_dir(config.model))
    logger.warning("no --model or tokenizer given: routing without prefix awareness")
    return None


def build_app(config: RouterConfig, tokenizer: PromptTokenizer | None = None) -> FastAPI:
    """Build the router app. The service starts (health checks, KV-event consumers) in the app's lifespan."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config)
    metrics = RouterMetrics()
    service = RouterService(config, tokenizer, metrics)
    api_keys = [k.encode() for k in config.api_keys if k]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="Tandem router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics

    def check_auth(request: Request) -> None:
        if not api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key (no early exit) in constant time per key.
        matched = False
        for key in api_keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")

    def request_headers(request: Request) -> dict[str, str]:
        headers = {"x-request-id": request.headers.get("x-request-id") or uuid.uuid4().hex}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def proxy(endpoint: str, request: Request) -> Response:
        headers = request_headers(request)
        try:
            check_auth(request)
        except RequestError as exc:
            metrics.requests.labels("none", "none", "unauthorized").inc()
            return exc.response(headers={"x-request-id": headers["x-request-id"]})
        return await service.handle(endpoint, await request.body(), headers)

    async def completions(request: Request) -> Response:
        return await proxy(COMPLETIONS, request)

    async def chat_completions(request: Request) -> Response:
        return await proxy(CHAT, request)

    # The hot endpoints are plain Starlette routes: they take the raw body anyway, and skipping FastAPI's
    # per-request dependency machinery is a measurable share of the router's own latency.
    app.router.routes.append(Route(COMPLETIONS, completions, methods=["POST"]))
    app.router.routes.append(Route(CHAT, chat_completions, methods=["POST"]))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_auth(request)
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
