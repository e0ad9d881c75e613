"""Tandem's engine as a disaggregated worker: the server extension that owns the KV connector, and the
command-line flags and entry point shared by ``tandem prefill`` and ``tandem decode``.

The connector is created before the engine (the scheduler takes it), and so are its metrics, in the registry
the server then exposes; the connector is attached to the engine's KV buffer on the engine thread once the
model is loaded, and closed when the server shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from tandem.kvtransfer.connector import LOAD_FAILURE_POLICIES, KVConnectorConfig, NixlConnector

if TYPE_CHECKING:
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.engine.server.app import ServerState
    from tandem.kvtransfer.metrics import KVTransferMetrics

DEFAULT_KV_PORTS = {"prefill": 5600, "decode": 5601}


def add_kv_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """The KV-transfer flags of a worker role."""
    g = parser.add_argument_group("kv transfer")
    g.add_argument("--kv-host", default="127.0.0.1", help="address of the KV handshake side channel")
    g.add_argument("--kv-port", type=int, default=DEFAULT_KV_PORTS[role],
                   help="port of the KV handshake side channel (0: any free port) (default: %(default)s)")
    g.add_argument("--advertise-kv-host", default=None,
                   help="host peers use to reach the side channel (default: --kv-host; 127.0.0.1 for 0.0.0.0)")
    g.add_argument("--kv-lease-seconds", type=float, default=30.0,
                   help="exported KV blocks are freed after this long if no reader confirmed (default: %(default)s)")
    g.add_argument("--ucx-transports", default=None,
                   help="UCX_TLS for NIXL's UCX backend, e.g. 'tcp,cma' (default: UCX's own choice)")
    g.add_argument("--kv-load-failure-policy", default="recompute", choices=LOAD_FAILURE_POLICIES,
                   help="when pulling KV fails: compute the prompt locally, or fail the request with a 502")
    g.add_argument("--kv-transfer-timeout", type=float, default=10.0, help="seconds one KV READ may take")


def connector_config_from_args(args: argparse.Namespace, role: str) -> KVConnectorConfig:
    return KVConnectorConfig(
        role=role,
        kv_host=args.kv_host,
        kv_port=args.kv_port,
        advertise_kv_host=args.advertise_kv_host,
        lease_seconds=args.kv_lease_seconds,
        ucx_transports=args.ucx_transports,
        load_failure_policy=args.kv_load_failure_policy,
        transfer_timeout_s=args.kv_transfer_timeout,
    )


class KVTransferExtension:
    """A ``ServerState`` extension: builds the engine with a ``NixlConnector`` and runs its lifecycle.

    Use ``build_engine`` as the server's engine factory and the object itself as an extension.
    """

    def __init__(self, config: KVConnectorConfig, metrics: KVTransferMetrics) -> None:
        self.config = config
        self.connector = NixlConnector(config)
        self.metrics = metrics

    def build_engine(self, engine_config: EngineConfig) -> LLMEngine:
        """Engine thread: load the engine with the connector, then register its KV cache with NIXL."""
        from tandem.engine.llm_engine import LLMEngine

        engine = LLMEngine(engine_config, connector=self.connector)
        self.connector.attach(engine.runner.kv_buffer, engine.runner.layout, engine.model_name, self.metrics)
        return engine

    async def startup(self, state: ServerState) -> None:
        port = self.connector.start_side_channel()
        state.engine.step_hooks.append(lambda _engine: self.connector.housekeeping())
        # A finished KV pull wakes the engine thread now, not at its next 5 ms poll.
        self.connector.on_load_result = state.engine.wake
        print(f"tandem: {self.config.role} worker, KV handshake on {self.config.kv_host}:{port} "
              f"(advertised {self.config.advertised_host}:{port})", file=sys.stderr)

    async def shutdown(self, state: ServerState) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.connector.close)


def run_worker(args: argparse.Namespace, role: str) -> int:
    """``tandem prefill`` / ``tandem decode``: the OpenAI server of ``tandem serve`` plus the KV connector."""
    from prometheus_client import CollectorRegistry

    from tandem.engine.server.cli import serve, server_config_from_args
    from tandem.kvtransfer.metrics import KVTransferMetrics

    try:
        config = connector_config_from_args(args, role)
        model_name = server_config_from_args(args, role).model_name
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # NOTE: the server's registry is made here, so the connector's metrics exist before the engine thread does.
    registry = CollectorRegistry(auto_describe=True)
    extension = KVTransferExtension(config, KVTransferMetrics(registry, model_name, role))
    return serve(args, role=role, extensions=[extension], engine_factory=extension.build_engine, registry=registry)
