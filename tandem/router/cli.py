"""``tandem router``: run the prefix-aware router in front of prefill, decode and aggregated workers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from tandem.runtime import freeze_startup_heap

if TYPE_CHECKING:
    from tandem.router.config import RouterConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None,
                        help="the model whose tokenizer the router uses, named as for the engines "
                             "(hf://ORG/NAME fetches its tokenizer files only)")
    parser.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (overrides --model's)")
    parser.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    parser.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable; env TANDEM_API_KEY)")
    parser.add_argument("--redis-url", default=None, help="Redis holding the KV-event streams (else direct channel)")
    parser.add_argument("--prefill", action="append", default=[], metavar="URL", help="prefill worker (repeatable)")
    parser.add_argument("--decode", action="append", default=[], metavar="URL", help="decode worker (repeatable)")
    parser.add_argument("--worker", action="append", default=[], metavar="URL", help="aggregated worker (repeatable)")
    parser.add_argument("--vllm-prefill", action="append", default=[], metavar="URL[,kv-events=tcp://H:P]",
                        help="vLLM prefill worker, NixlConnector producer (repeatable)")
    parser.add_argument("--vllm-decode", action="append", default=[], metavar="URL[,kv-events=tcp://H:P]",
                        help="vLLM decode worker, NixlConnector consumer (repeatable)")
    parser.add_argument("--vllm-worker", action="append", default=[], metavar="URL[,kv-events=tcp://H:P]",
                        help="aggregated vLLM worker (repeatable)")
    parser.add_argument("--vllm-kv-events-port", type=int, default=5557,
                        help="port of vLLM workers' KV-event ZMQ publisher on their host (default 5557)")
    parser.add_argument("--vllm-kv-events-replay-port", type=int, default=None,
                        help="port of vLLM workers' KV-event replay socket on their host (their kv-events-config "
                             "replay_endpoint; default: none, missed batches are relearned)")
    parser.add_argument("--vllm-kv-events-topic", default="kv-events", help="topic vLLM publishes KV events on")
    parser.add_argument("--k8s-namespace", default=None)
    parser.add_argument("--k8s-prefill-selector", default=None, metavar="K=V,...")
    parser.add_argument("--k8s-decode-selector", default=None, metavar="K=V,...")
    parser.add_argument("--k8s-worker-selector", default=None, metavar="K=V,...")
    parser.add_argument("--k8s-port", type=int, default=8000, help="workers' HTTP port inside their pods")
    parser.add_argument("--scorer-weights", default=None, help="prefill/aggregated pools, e.g. prefix=3,queue=1,kv=1,inflight=1")
    parser.add_argument("--decode-scorer-weights", default=None, help="decode pool, e.g. prefix=1,queue=1,kv=1,inflight=2")
    parser.add_argument("--policy", choices=("prefix", "round_robin"), default="prefix",
                        help="round_robin ignores caches and load (a benchmark baseline)")
    parser.add_argument("--disagg-threshold", type=int, default=256,
                        help="uncached prompt tokens below which decode serves alone (no prefill hop)")
    parser.add_argument("--kv-event-ttl", type=float, default=10.0, help="seconds without events before a worker's index entries expire")
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--max-migrations", type=int, default=2,
                        help="times a stream whose worker fails mid-way is resumed on another worker (0: never)")
    parser.add_argument("--stream-stall-timeout", type=float, default=60.0,
                        help="seconds without data after which a stream's worker counts as failed (and it migrates)")
    parser.add_argument("--health-interval", type=float, default=1.0)
    parser.add_argument("--outlier-base-ejection", type=float, default=5.0,
                        help="seconds a failing worker is ejected for, times its consecutive ejections")
    parser.add_argument("--outlier-max-ejection", type=float, default=120.0, help="cap on one ejection, seconds")
    parser.add_argument("--tenants-file", default=None,
                        help="YAML/JSON mapping API keys to tenants and their per-minute limits (watched for changes)")
    parser.add_argument("--ratelimit-redis-url", default=None,
                        help="Redis sharing tenant limits across router replicas (default: --redis-url)")
    parser.add_argument("--max-queue-per-worker", type=int, default=None,
                        help="answer 429 + Retry-After when every eligible worker has this many requests queued")
    parser.add_argument("--outlier-consecutive-5xx", type=int, default=3,
                        help="5xx answers in a row that eject a worker (connection errors eject at once)")
    parser.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> "RouterConfig":
    from tandem.router.config import (
        DEFAULT_DECODE_WEIGHTS,
        DEFAULT_PREFILL_WEIGHTS,
        RouterConfig,
        parse_weights,
    )

    # Like `tandem serve`: repeatable --api-key, else TANDEM_API_KEY (comma-separated).
    keys = list(args.api_key) or [k.strip() for k in os.environ.get("TANDEM_API_KEY", "").split(",") if k.strip()]
    from tandem.protocol.model_source import default_served_name

    model = args.model
    if model is None and args.tokenizer is None:
        from tandem.protocol.model_source import DEFAULT_MODEL

        model = DEFAULT_MODEL
    return RouterConfig(
        served_model_name=args.served_model_name or (default_served_name(model) if model else "model"),
        model=model,
        tokenizer_dir=args.tokenizer,
        api_keys=tuple(keys),
        redis_url=args.redis_url,
        prefill_urls=tuple(args.prefill),
        decode_urls=tuple(args.decode),
        worker_urls=tuple(args.worker),
        vllm_prefill_urls=tuple(args.vllm_prefill),
        vllm_decode_urls=tuple(args.vllm_decode),
        vllm_worker_urls=tuple(args.vllm_worker),
        vllm_kv_events_port=args.vllm_kv_events_port,
        vllm_kv_events_replay_port=args.vllm_kv_events_replay_port,
        vllm_kv_events_topic=args.vllm_kv_events_topic,
        prefill_weights={**DEFAULT_PREFILL_WEIGHTS, **parse_weights(args.scorer_weights or "")},
        decode_weights={**DEFAULT_DECODE_WEIGHTS, **parse_weights(args.decode_scorer_weights or "")},
        disagg_threshold=args.disagg_threshold,
        kv_event_ttl_s=args.kv_event_ttl,
        max_retries=args.max_retries,
        max_migrations=args.max_migrations,
        stream_stall_timeout_s=args.stream_stall_timeout,
        health_interval_s=args.health_interval,
        outlier_base_ejection_s=args.outlier_base_ejection,
        outlier_max_ejection_s=args.outlier_max_ejection,
        outlier_consecutive_5xx=args.outlier_consecutive_5xx,
        max_queue_per_worker=args.max_queue_per_worker,
        tenants_file=args.tenants_file,
        ratelimit_redis_url=args.ratelimit_redis_url,
        policy=args.policy,
        k8s_namespace=args.k8s_namespace,
        k8s_prefill_selector=args.k8s_prefill_selector,
        k8s_decode_selector=args.k8s_decode_selector,
        k8s_worker_selector=args.k8s_worker_selector,
        k8s_port=args.k8s_port,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.protocol.model_source import ModelNotFoundError
    from tandem.router.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: far too chatty for a proxy's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        logging.getLogger("tandem.router").error("bad configuration: %s", exc)
        return 2
    if not (config.has_static_workers or config.uses_k8s):
        logging.getLogger("tandem.router").error(
            "no workers: give --prefill/--decode/--worker (or --vllm-*) URLs or --k8s-* selectors")
        return 2
    try:
        app = build_app(config)
    except ModelNotFoundError as exc:  # the model's tokenizer files could not be found or fetched
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # NOTE: everything loaded so far (modules, the tokenizer, the app) lives as long as the process: frozen out
    # of the garbage collector's view, a full collection is 0.6 ms instead of a 53 ms pause on the request path.
    freeze_startup_heap("router")
    # Keep-alive longer than uvicorn's 5 s default: clients and load balancers reuse connections between
    # requests, and a router closing them early turns into failed requests on their side.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                loop="uvloop", timeout_graceful_shutdown=5, timeout_keep_alive=75, backlog=4096)
    return 0
