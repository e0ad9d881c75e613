"""``tandem operator``: run the kopf operator that reconciles ``LLMDeployment`` objects."""

from __future__ import annotations

import argparse
import asyncio
import logging

from tandem.kube import KubeConfigError, KubeConnection, connect
from tandem.operator.handlers import OperatorOptions, build_registry, make_client
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.reconcile import Reconciler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tandem operator``."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed); default: all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file when not running in a cluster")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    parser.add_argument("--server", default=None,
                        help="API server URL to use without credentials (a local proxy, `kubectl proxy`)")
    parser.add_argument("--liveness-host", default="0.0.0.0", help="host of the liveness endpoint")
    parser.add_argument("--liveness-port", type=int, default=8080, help="port of /healthz (0 disables)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="host of the Prometheus metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=9090, help="port of /metrics (0 disables)")
    parser.add_argument("--resync-seconds", type=float, default=30.0,
                        help="how often every LLMDeployment is re-reconciled (drift repair, status)")
    parser.add_argument("--peering", default=None,
                        help="kopf peering name for several operator replicas (default: standalone)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # Without an action the operator runs; `render` is a dry run that needs no cluster.
    from tandem.operator import render_cli

    actions = parser.add_subparsers(dest="operator_action", metavar="ACTION")
    render_cli.add_arguments(actions.add_parser(
        "render", help="print the objects the operator would apply for an LLMDeployment file (no cluster)",
        description="Validate an LLMDeployment file against the CRD and print, as a YAML stream, exactly the "
                    "objects the operator would apply for it."))


async def _connect(args: argparse.Namespace) -> KubeConnection:
    return await connect(server=args.server, kubeconfig=args.kubeconfig, context=args.context)


async def _serve(args: argparse.Namespace) -> None:
    from prometheus_client import start_http_server
    import kopf

    connection = await _connect(args)
    metrics = OperatorMetrics()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    client = make_client(connection, reconnect=lambda: _connect(args))
    try:
        reconciler = Reconciler(client, metrics)
        registry = build_registry(lambda: _connect(args), reconciler,
                                  OperatorOptions(resync_seconds=args.resync_seconds))
        liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
        await kopf.operator(
            registry=registry,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.peering is None,
            peering_name=args.peering,
            liveness_endpoint=liveness,
        )
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    """Run the operator until interrupted (or, for ``render``, print its objects); returns the exit code."""
    if getattr(args, "operator_action", None) == "render":
        from tandem.operator import render_cli

        return render_cli.run(args)
    if args.resync_seconds <= 0:
        raise SystemExit("--resync-seconds must be positive")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args))
    except KubeConfigError as e:
        raise SystemExit(f"tandem operator: {e}") from None
    return 0
