"""The router's request path: tokenize and hash, pick workers, run prefill -> decode (or one hop), relay.

NOTE: every request ends with a response or an error and is counted in ``tandem:router_requests``:
failures before the first byte reach the client are retried on another worker (bounded, with backoff);
a single-choice stream whose worker fails after that is resumed on another worker as a continuation of the
tokens generated so far (``--max-migrations``, see migration.py); a stream that cannot be resumed ends with an
error event. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from starlette.responses import Response

from tandem.protocol.hashing import hash_block_tokens
from tandem.protocol.kv_transfer import KVTransferParams
from tandem.router.config import RouterConfig, parse_vllm_worker
from tandem.router.errors import RequestError
from tandem.router.events import DirectEventConsumer, RedisEventConsumer, expire_loop
from tandem.router.vllm_events import VllmEventConsumer
from tandem.router.index import PrefixIndex
from tandem.router.migration import (
    RETURN_TOKEN_IDS,
    StreamState,
    migratable,
    with_token_ids,
)
from tandem.router.metrics import RouterMetrics, WorkerStateCollector
from tandem.router.ratelimit import RateLimiter
from tandem.router.relay import TRANSPORT_ERRORS as _TRANSPORT_ERRORS
from tandem.router.relay import Migration, RelayResponse
from tandem.router.scheduling import HealthyFilter, ModelFilter, Pick, RoundRobinProfile, RoutingRequest, build_profile
from tandem.router.tenants import Tenant, TenantWatcher
from tandem.tracing import SpanKind, current_traceparent, mark_error, setup_tracing, tracer
from tandem.router.tokenizer import PromptTokenizer, chat_token_ids, messages_token_ids
from tandem.router.transport import AsyncioHTTPTransport, ProxyClient
from tandem.router.workers import Datastore, HealthChecker, OutlierPolicy, Pool, Worker

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"  # Anthropic's Messages API: routed like chat, errors in Anthropic's shape



@dataclass(slots=True)
class _Attempt:
    """The outcome of one attempt that did not produce a response for the client."""

    reason: str
    response: Response | None = None  # an upstream 5xx answer, returned if every retry fails too


class _Refused(Exception):
    """A request refused before routing, with its ready response and its outcome label."""

    def __init__(self, response: Response, outcome: str) -> None:
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


class RouterService:
    """Owns the datastore, index, pickers and HTTP client; ``handle`` serves one OpenAI request."""

    def __init__(self, config: RouterConfig, tokenizer: PromptTokenizer | None, metrics: RouterMetrics) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.datastore = Datastore(outlier=OutlierPolicy(
            base_s=config.outlier_base_ejection_s, max_s=config.outlier_max_ejection_s,
            consecutive_5xx=config.outlier_consecutive_5xx))
        self.datastore.on_eject = lambda w: metrics.ejections.labels(w.pool.value, w.url).inc()
        metrics.registry.register(WorkerStateCollector(lambda: list(self.datastore.workers.values())))
        for urls, pool in ((config.prefill_urls, Pool.PREFILL), (config.decode_urls, Pool.DECODE),
                           (config.worker_urls, Pool.AGGREGATED)):
            for url in urls:
                self.datastore.add(url, pool)
        for specs, pool in ((config.vllm_prefill_urls, Pool.PREFILL), (config.vllm_decode_urls, Pool.DECODE),
                            (config.vllm_worker_urls, Pool.AGGREGATED)):
            for spec in specs:
                url, kv_events, replay = parse_vllm_worker(spec)
                worker = self.datastore.add(url, pool, kind="vllm", kv_events_endpoint=kv_events)
                worker.kv_events_replay = replay
        self.index = PrefixIndex(config.kv_event_ttl_s, config.default_block_size)
        rng = random.Random()
        if config.policy == "round_robin":
            filters = [HealthyFilter(), ModelFilter()]
            self.profiles = {pool: RoundRobinProfile(filters, self.index) for pool in Pool}
        else:
            self.profiles = {
                Pool.PREFILL: build_profile(config.prefill_weights, self.index, rng),
                Pool.AGGREGATED: build_profile(config.prefill_weights, self.index, rng),
                Pool.DECODE: build_profile(config.decode_weights, self.index, rng),
            }
        # Gauges read at scrape time, so they are never stale.
        metrics.index_blocks.set_function(lambda: self.index.num_blocks())
        for pool in Pool:
            metrics.healthy_workers.labels(pool.value).set_function(
                lambda pool=pool: sum(w.healthy for w in self.datastore.pool(pool)))
        self.client: httpx.AsyncClient | None = None
        self.proxy: ProxyClient | None = None
        # Parsed upstream URL and Host header by worker URL + endpoint (httpx's URL parsing is a noticeable
        # per-request cost).
        self._targets: dict[str, tuple[httpx.URL, bytes]] = {}
        self.health: HealthChecker | None = None
        self.redis_consumer: RedisEventConsumer | None = None
        self.vllm_consumer: VllmEventConsumer | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Future] = set()
        self._tracing = False
        self._tracer = tracer("tandem.router")
        self.tenants = TenantWatcher(config.tenants_file) if config.tenants_file else None
        self.ratelimiter: RateLimiter | None = None
        if self.tenants is not None:
            self.ratelimiter = RateLimiter(config.ratelimit_redis_url or config.redis_url,
                                           lambda shared: metrics.ratelimit_shared.set(1 if shared else 0))

    # ---- lifecycle ----

    async def start(self) -> None:
        """Open the upstream client and start the watchers (health, KV events, expiry, discovery)."""
        cfg = self.config
        self._tracing = setup_tracing("tandem-router")  # OTEL_* variables; off by default
        timeout = httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s)
        # The request path's client: httpx on the router's own HTTP/1.1 transport for http:// workers (see
        # transport.py); httpx's default transport for anything else (https).
        self.proxy = ProxyClient(timeout=timeout, mounts={"http://": AsyncioHTTPTransport()}, trust_env=False)
        # Watchers (health checks, direct KV-event streams) get their own client and connections, out of the
        # request path's pool, on the same transport (they share the router's one event loop with it).
        self.client = httpx.AsyncClient(timeout=timeout, mounts={"http://": AsyncioHTTPTransport()}, trust_env=False)
        self.health = HealthChecker(self.datastore, self.client, cfg.health_interval_s, cfg.health_timeout_s)
        self._spawn(self.health.run(), "health")
        self._spawn(expire_loop(self.index), "index-expiry")
        if cfg.redis_url:
            self.redis_consumer = RedisEventConsumer(cfg.redis_url, cfg.served_model_name, self.index,
                                                     lambda up: self.metrics.redis_connected.set(1 if up else 0))
            self._spawn(self.redis_consumer.run(), "redis-events")
        else:
            self._spawn(DirectEventConsumer(self.datastore, self.index, self.client, cfg.kv_event_ttl_s).run(),
                        "direct-events")
        # vLLM workers publish over ZMQ whatever carries Tandem workers' events (each router replica subscribes).
        self.vllm_consumer = VllmEventConsumer(self.datastore, self.index, cfg.vllm_kv_events_port,
                                               cfg.vllm_kv_events_topic,
                                               default_replay_port=cfg.vllm_kv_events_replay_port)
        self._spawn(self.vllm_consumer.run(), "vllm-events")
        if self.tenants is not None:
            self._spawn(self.tenants.run(), "tenants-watch")
        if cfg.uses_k8s:
            from tandem.router.k8s import KubernetesDiscovery

            self._spawn(KubernetesDiscovery.from_config(cfg, self.datastore).run(), "k8s-discovery")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    @staticmethod
    def _task_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("router task %s crashed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.ratelimiter is not None:
            await self.ratelimiter.close()
        for client in (self.proxy, self.client):
            if client is not None:
                await client.aclose()
        self.proxy = None

    def _upstream_request(self, worker: Worker, endpoint: str, headers: dict[str, str], body: bytes) -> httpx.Request:
        """A POST of ``body`` to ``worker``, with exactly ``headers`` plus Host and Content-Length.

        NOTE: built from its parts (a cached URL, every header given, ``stream=``): httpx then skips URL parsing,
        content encoding and header merging, about three quarters of the cost of ``client.build_request``.
        """
        key = worker.url + endpoint
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) > 4096:  # workers come and go under Kubernetes discovery
                self._targets.clear()
            url = httpx.URL(key)
            target = self._targets[key] = (url, url.netloc)
        url, host = target
        raw = [(b"host", host), (b"content-length", b"%d" % len(body))]
        raw += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        return httpx.Request("POST", url, headers=raw, stream=httpx.ByteStream(body))

    def ready(self) -> bool:
        """True when some worker can serve a whole request (a decode or aggregated worker is healthy)."""
        return any(w.healthy for w in self.datastore.workers.values() if w.pool != Pool.PREFILL)

    # ---- request path ----

    def routing_request(self, endpoint: str, body: dict[str, Any]) -> RoutingRequest:
        """Validate what routing needs and turn the prompt into block hashes (the engine's own hasher)."""
        return self._routing_request(body.get("model"), self.prompt_token_ids(endpoint, body))

    def _routing_request(self, model: str, token_ids: list[int] | None) -> RoutingRequest:
        if token_ids is None:
            return RoutingRequest(model=model)
        return RoutingRequest(model=model, block_hashes=hash_block_tokens(token_ids, self.index.block_size),
                              num_prompt_tokens=len(token_ids))

    def prompt_token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        """Validate what routing needs; the prompt's token ids as the engine will see them (None without a
        tokenizer)."""
        model = body.get("model")
        if model != self.config.served_model_name:
            raise RequestError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        token_ids: list[int] | None = None
        if endpoint == CHAT:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RequestError(400, "'messages' must be a non-empty list of message objects", "messages")
            if self.tokenizer is not None:
                token_ids = chat_token_ids(self.tokenizer, body)
        elif endpoint == MESSAGES:
            token_ids = messages_token_ids(self.tokenizer, body) if self.tokenizer is not None else None
        else:
            token_ids = self._prompt_tokens(body.get("prompt", None))
        return token_ids

    def _prompt_tokens(self, prompt: Any) -> list[int] | None:
        # A batch of prompts is routed by its first one: they all go to the same worker.
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt) if self.tokenizer is not None else None
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise RequestError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")

    async def handle(self, endpoint: str, raw_body: bytes, headers: dict[str, str]) -> Response:
        """Serve one completions/chat request end to end."""
        self.metrics.inflight.inc()
        finished = False

        def done(pool: str, worker: str, outcome: str) -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.metrics.inflight.dec()
                self.metrics.requests.labels(pool, worker, outcome).inc()

        try:
            if self._tracing:
                with self._tracer.start_as_current_span(
                        f"router {endpoint}", context=extract({"traceparent": headers.get("traceparent", "")}),
                        kind=SpanKind.SERVER, attributes={"tandem.request_id": headers["x-request-id"]}):
                    response = await self._handle(endpoint, raw_body, headers, done)
            else:
                response = await self._handle(endpoint, raw_body, headers, done)
        except _Refused as refused:
            done("none", "none", refused.outcome)
            return refused.response
        except RequestError as exc:
            outcome = "overloaded" if exc.status == 429 else "rejected" if exc.status < 500 else "unavailable"
            done("none", "none", outcome)
            reply_headers = {"x-request-id": headers["x-request-id"]}
            if exc.status == 429:
                reply_headers["retry-after"] = str(self.config.overload_retry_after_s)
            return exc.response(headers=reply_headers, anthropic=endpoint == MESSAGES)
        except BaseException:
            done("none", "none", "router_error")
            raise
        return response

    async def _handle(self, endpoint: str, raw_body: bytes, headers: dict[str, str],
                      done: Callable[[str, str, str], None]) -> Response:
        try:
            body = json.loads(raw_body)
        except ValueError as exc:
            raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be a boolean", "stream")
        started = time.perf_counter()
        request_token_ids = self.prompt_token_ids(endpoint, body)
        request = self._routing_request(body.get("model"), request_token_ids)
        decode_pool = self.datastore.pool(Pool.DECODE)
        use_pd = any(w.healthy for w in decode_pool)
        pool = Pool.DECODE if use_pd else Pool.AGGREGATED
        tenant = await self._admit_tenant(headers, request.num_prompt_tokens)
        self._check_overload(request, pool)
        final = self.profiles[pool].pick(request, self.datastore.pool(pool))
        if final is None:
            raise RequestError(503, "no healthy worker serves this model", code="no_healthy_worker")
        prefill: Pick | None = None
        if use_pd:
            uncached = request.num_prompt_tokens - final.matched_blocks * self.index.block_size
            if uncached >= self.config.disagg_threshold:
                # NOTE: KV moves only between engines of one kind (Tandem's connector or vLLM's NixlConnector).
                prefill = self.profiles[Pool.PREFILL].pick(
                    request, [w for w in self.datastore.pool(Pool.PREFILL) if w.kind == final.worker.kind])
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        total_blocks = len(request.block_hashes)
        upstream_headers = {"content-type": "application/json", "x-request-id": headers["x-request-id"]}
        if "authorization" in headers:
            upstream_headers["authorization"] = headers["authorization"]
        if "traceparent" in headers:  # passed on as it came unless the router traces (then each hop's span)
            upstream_headers["traceparent"] = headers["traceparent"]

        payload = raw_body
        migration: Migration | None = None
        upstream_body = body
        # vLLM has no continuation request to resume a stream on: its streams are relayed without migration.
        if stream and final.worker.kind == "tandem" and self.config.max_migrations > 0 and endpoint != MESSAGES \
                and migratable(body):
            # The engines return the generated token ids on every chunk: the router keeps them to resume the
            # stream elsewhere if its worker fails, and strips them before the client sees them.
            state = StreamState(endpoint_is_chat=endpoint == CHAT, client_wants_token_ids=body.get(RETURN_TOKEN_IDS) is True,
                                prompt_token_ids=request_token_ids)
            upstream_body = with_token_ids(body)
            payload = json.dumps(upstream_body).encode()
            migration = Migration(self, pool, request, endpoint, upstream_body, upstream_headers, state, done)
        if prefill is not None:
            if total_blocks:
                self.metrics.prefix_hit_ratio.labels(Pool.PREFILL.value).observe(prefill.matched_blocks / total_blocks)
            params = await self._prefill(prefill.worker, endpoint, body, upstream_headers)
            if isinstance(params, Response):
                done(Pool.PREFILL.value, prefill.worker.url, "client_error")
                return params
            if params is None:
                self.metrics.decisions.labels("prefill_fallback").inc()
            else:
                self.metrics.decisions.labels("disaggregated").inc()
                if self._tracing and current_traceparent():  # the decode worker's KV transfer joins the trace
                    params = {**params, "traceparent": current_traceparent()}
                payload = json.dumps({**upstream_body, "kv_transfer_params": params}).encode()
        else:
            self.metrics.decisions.labels("direct" if use_pd else "aggregated").inc()
            if total_blocks:
                self.metrics.prefix_hit_ratio.labels(pool.value).observe(final.matched_blocks / total_blocks)
        response = await self._serve(pool, request, final, endpoint, payload, stream, upstream_headers, done, migration)
        if tenant is not None:
            self._charge_completion(tenant, response, migration)
        return response

    # ---- tenants ----

    async def _admit_tenant(self, headers: dict[str, str], prompt_tokens: int) -> Tenant | None:
        """The request's tenant, admitted under its limits (None when no tenants are configured); refuses with
        401 (unknown key) or 429 (over a limit, with Retry-After and x-ratelimit-* headers)."""
        if self.tenants is None:
            return None
        scheme, _, key = headers.get("authorization", "").partition(" ")
        tenant = self.tenants.table.tenant_for(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        decision = await self.ratelimiter.admit(tenant, prompt_tokens)
        request_id = headers["x-request-id"]
        if not decision.admitted:
            self.metrics.tenant_requests.labels(tenant.name, "rate_limited").inc()
            # NOTE: the tenant is named in the log, never in the response (which only its own caller sees anyway).
            logger.info("request %s of tenant %s refused: over its %s-per-minute limit (retry after %d s)",
                        request_id, tenant.name, decision.limit, decision.retry_after_s)
            error = RequestError(429, f"Rate limit reached for {decision.limit} per minute; retry after "
                                      f"{decision.retry_after_s} s.", code="rate_limit_exceeded")
            raise _Refused(error.response(headers={"x-request-id": request_id, "retry-after": str(decision.retry_after_s),
                                                   **decision.headers}), "rate_limited")
        self.metrics.tenant_requests.labels(tenant.name, "admitted").inc()
        self.metrics.tenant_tokens.labels(tenant.name).inc(prompt_tokens)
        return tenant

    def _charge_completion(self, tenant: Tenant, response: Response, migration: Migration | None) -> None:
        """Count the completion's tokens against the tenant once they are known."""
        def charge(tokens: int) -> None:
            if tokens > 0:
                self.metrics.tenant_tokens.labels(tenant.name).inc(tokens)
                self._spawn_once(self.ratelimiter.charge(tenant, tokens))

        if isinstance(response, RelayResponse):
            if migration is not None:  # streams whose token ids the router follows
                migration.on_finish = lambda: charge(len(migration.state.token_ids))
            return
        try:
            usage = json.loads(bytes(response.body)).get("usage") or {}
            charge(int(usage.get("completion_tokens") or 0))
        except (ValueError, TypeError, AttributeError):
            return

    def _spawn_once(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _check_overload(self, request: RoutingRequest, pool: Pool) -> None:
        """429 at once when every worker that could serve the request has a queue at the bound: queueing
        without limit only turns into timeouts (the engine's own --max-waiting-requests 503 stays)."""
        bound = self.config.max_queue_per_worker
        if bound is None:
            return
        now = time.monotonic()
        eligible = [w for w in self.datastore.pool(pool)
                    if w.admits(now) and (w.models is None or request.model in w.models)]
        # A worker's queue: what it reports waiting, or what the router has sent it beyond what it runs (fresher).
        if eligible and all(max(w.num_waiting, w.inflight - w.num_running) >= bound for w in eligible):
            raise RequestError(429, f"every {pool.value} worker has {bound} or more requests queued; retry later",
                               code="overloaded")

    async def _prefill(self, worker: Worker, endpoint: str, body: dict[str, Any],
                       headers: dict[str, str]) -> dict[str, Any] | Response | None:
        """Run the prefill hop. Returns kv_transfer_params, a client-error response to pass on, or None
        when the prefill worker failed (the decode worker then serves the request alone)."""
        payload = {**body, "kv_transfer_params": {"do_remote_decode": True}, "max_tokens": 1, "stream": False, "n": 1}
        payload.pop("stream_options", None)
        if endpoint == MESSAGES:
            payload.pop("n")  # not a Messages API field
        if "max_completion_tokens" in payload:
            payload["max_completion_tokens"] = 1
        if isinstance(payload.get("min_tokens"), int) and payload["min_tokens"] > 1:
            payload["min_tokens"] = 1  # the first token obeys it (no EOS) and the decode worker continues from it
        worker.inflight += 1
        self.datastore.begin_request(worker)
        sent = time.perf_counter()
        span, hop_headers = self._start_hop("router prefill", worker, headers)
        try:
            response = await self.proxy.send(self._upstream_request(worker, endpoint, hop_headers,
                                                                    json.dumps(payload).encode()))
        except _TRANSPORT_ERRORS as exc:
            self.datastore.mark_failed(worker, f"{type(exc).__name__}: {exc}")
            self.metrics.requests.labels(Pool.PREFILL.value, worker.url, "failed").inc()
            logger.warning("prefill on %s failed (%s); serving on the decode worker alone", worker.url, exc)
            if span is not None:
                mark_error(span, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            worker.inflight -= 1
            if span is not None:
                span.end()
        if 400 <= response.status_code < 500:
            self.datastore.record_success(worker)  # the client's error: the worker is fine
            return Response(response.content, response.status_code, headers={
                "content-type": response.headers.get("content-type", "application/json"),
                "x-request-id": headers["x-request-id"]})
        params = None
        if response.status_code == 200:
            try:
                raw_params = response.json().get("kv_transfer_params")
                if worker.kind == "vllm":
                    # vLLM's NixlConnector speaks its own params (block ids per KV-cache group, remote_num_tokens,
                    # no first token: its decode side computes the first token again): passed through as given.
                    params = raw_params if isinstance(raw_params, dict) and raw_params.get("do_remote_prefill") else None
                else:
                    # Parsed (and so checked) once here, then passed on in the wire format, other connectors' fields kept.
                    parsed = KVTransferParams.parse(raw_params)
                    params = parsed.to_dict() if parsed is not None else None
            except (ValueError, AttributeError) as exc:
                logger.warning("prefill on %s answered malformed kv_transfer_params: %s", worker.url, exc)
                params = None
        if not isinstance(params, dict):
            if response.status_code >= 500:
                self.datastore.mark_failed(worker, f"status {response.status_code}")
            else:
                self.datastore.record_success(worker)  # it answered: a protocol mismatch is not an outage
            self.metrics.requests.labels(Pool.PREFILL.value, worker.url, "failed").inc()
            logger.warning("prefill on %s gave no kv_transfer_params (status %d); serving on the decode worker alone",
                           worker.url, response.status_code)
            return None
        self.datastore.record_success(worker, time.perf_counter() - sent)
        self.metrics.requests.labels(Pool.PREFILL.value, worker.url, "ok").inc()
        return params

    async def _serve(self, pool: Pool, request: RoutingRequest, pick: Pick, endpoint: str, payload: bytes,
                     stream: bool, headers: dict[str, str], done: Callable[[str, str, str], None],
                     migration: Migration | None = None) -> Response:
        """The last hop, retried on other workers of the pool while nothing has reached the client."""
        tried: set[str] = set()
        failures: list[str] = []
        last_upstream: Response | None = None
        current: Pick | None = pick
        for attempt in range(self.config.max_retries + 1):
            if current is None:
                break
            if attempt:
                self.metrics.retries.labels(pool.value).inc()
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            worker = current.worker
            tried.add(worker.url)
            result = await self._attempt(pool, worker, endpoint, payload, stream, headers, done, migration)
            if isinstance(result, Response):
                return result
            failures.append(f"{worker.url}: {result.reason}")
            last_upstream = result.response or last_upstream
            current = self.profiles[pool].pick(request, self.datastore.pool(pool), exclude=tried)
        if last_upstream is not None:
            done(pool.value, "none", "upstream_error")
            return last_upstream
        done(pool.value, "none", "unavailable")
        raise RequestError(503, "no worker could serve the request: " + "; ".join(failures) if failures
                           else "no healthy worker serves this model", code="no_healthy_worker")

    async def _attempt(self, pool: Pool, worker: Worker, endpoint: str, payload: bytes, stream: bool,
                       headers: dict[str, str], done: Callable[[str, str, str], None],
                       migration: Migration | None = None) -> Response | _Attempt:
        worker.inflight += 1
        self.datastore.begin_request(worker)
        sent = time.perf_counter()
        released = False

        def release(outcome: str | None) -> None:
            nonlocal released
            if not released:
                released = True
                worker.inflight -= 1
            if outcome is not None:
                done(pool.value, worker.url, outcome)

        upstream: httpx.Response | None = None
        span, hop_headers = self._start_hop(f"router {pool.value}", worker, headers)
        try:
            upstream = await self.proxy.send(self._upstream_request(worker, endpoint, hop_headers, payload), stream=True)
            reply_headers = {"x-request-id": headers["x-request-id"]}
            if upstream.status_code >= 500:
                body = await upstream.aread()
                await upstream.aclose()
                if upstream.status_code in (502, 503, 504):
                    self.datastore.mark_failed(worker, f"status {upstream.status_code}")
                else:
                    self.datastore.record_status(worker, upstream.status_code, f"status {upstream.status_code}")
                release(None)
                return _Attempt(f"status {upstream.status_code}", Response(body, upstream.status_code, headers={
                    **reply_headers, "content-type": upstream.headers.get("content-type", "application/json")}))
            if not stream or upstream.status_code != 200:
                body = await upstream.aread()
                await upstream.aclose()
                # NOTE: no TTFT from a whole answer: its time grows with max_tokens, not with the worker's speed.
                self.datastore.record_success(worker)
                release("ok" if upstream.status_code == 200 else "client_error")
                return Response(body, upstream.status_code, headers={
                    **reply_headers, "content-type": upstream.headers.get("content-type", "application/json")})
            chunks = upstream.aiter_raw()
            # Wait for the first chunk before answering, so a worker that dies before producing anything
            # is still retried elsewhere.
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = b""
            self.datastore.record_success(worker, time.perf_counter() - sent)
            if migration is not None:
                migration.worker = worker
            return RelayResponse(first, upstream, chunks, reply_headers, release, migration)
        except _TRANSPORT_ERRORS as exc:
            if upstream is not None:
                await upstream.aclose()
            self.datastore.mark_failed(worker, f"{type(exc).__name__}: {exc}")
            release(None)
            return _Attempt(f"{type(exc).__name__}: {exc}")
        except BaseException:
            if upstream is not None:
                await upstream.aclose()
            worker.trial_inflight = False  # no verdict (cancelled): the next request is the trial
            release(None)
            raise
        finally:
            if span is not None:  # the hop's span: until the answer, or a stream's first bytes
                span.end()

    def _start_hop(self, name: str, worker: Worker, headers: dict[str, str]) -> tuple[Any, dict[str, str]]:
        """A client span for one upstream hop and the headers carrying its traceparent ((None, headers) when the
        router does not trace). The caller ends the span."""
        if not self._tracing:
            return None, headers
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT,
                                       attributes={"tandem.worker": worker.url, "tandem.pool": worker.pool.value})
        hop_headers = dict(headers)
        inject(hop_headers, context=trace.set_span_in_context(span))
        return span, hop_headers
