"""``tandem serve``: one aggregated engine behind the OpenAI API (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from tandem.engine.cli import add_engine_arguments, engine_config_from_args


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (repeatable; "
                        "also TANDEM_API_KEY, comma-separated). /health and /metrics stay open.")
    g.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) clients use in 'model' (default: the --model value)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="answer 503 when this many requests are already waiting")
    g.add_argument("--advertise-url", default=None, help="this worker's URL as routers see it (KV events identity)")
    g.add_argument("--kv-events-redis", default=None, metavar="URL",
                   help="also publish KV-cache events to this Redis (stream tandem:kv_events:<model>)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_server_arguments(parser)


def api_keys_from(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    env = os.environ.get("TANDEM_API_KEY", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    return keys


def server_config_from_args(args: argparse.Namespace, role: str):
    from tandem.engine.server.app import ServerConfig
    from tandem.protocol.model_source import default_served_name

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return ServerConfig(
        served_model_names=args.served_model_name or [default_served_name(args.model) if args.model else args.model],
        api_keys=api_keys_from(args),
        max_waiting_requests=args.max_waiting_requests,
        advertise_url=args.advertise_url or f"http://{host}:{args.port}",
        kv_events_redis=args.kv_events_redis,
        role=role,
    )


def serve(args: argparse.Namespace, role: str = "aggregated", extensions=(), engine_factory=None,
          registry=None) -> int:
    """Build the engine and app, then run uvicorn until SIGINT/SIGTERM (graceful)."""
    import uvicorn

    from tandem.engine.async_engine import AsyncEngine
    from tandem.engine.server.app import ServerState, build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config = engine_config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = AsyncEngine(engine_config, engine_factory)
    state = ServerState(engine, server_config_from_args(args, role), registry)
    state.extensions.extend(extensions)
    app = build_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, loop="auto", http="auto")
    server = uvicorn.Server(config)
    # A worker whose engine cannot start (bad model path, too little KV cache memory) exits with status 1 and
    # the reason, as an orchestrator expects (a crash it reports and restarts), instead of serving 503s forever.
    state.on_engine_start_failure = lambda _error: setattr(server, "should_exit", True)
    # NOTE: uvicorn re-raises the signal it caught once shutdown is done; a no-op handler makes a
    # graceful SIGTERM end with exit status 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if engine.error is not None:
        print(f"error: {engine.error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return serve(args)
