"""`tandem operator` as a real process against the emulator: reconciles, serves /healthz and /metrics, stops on SIGINT."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import httpx
import pytest

from operator_support import LLMD_API, NAMESPACE, Cluster, eventually
from tandem.cli import build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_arguments_parse_and_bad_values_are_refused():
    parser = build_parser("operator")
    args = parser.parse_args(["operator", "-n", "a", "-n", "b", "--resync-seconds", "5"])
    assert args.namespace == ["a", "b"] and args.resync_seconds == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["operator", "--namespace", "a", "--all-namespaces"])
    from tandem.operator.cli import run
    with pytest.raises(SystemExit, match="--resync-seconds must be positive"):
        run(parser.parse_args(["operator", "--resync-seconds", "0"]))


async def test_operator_process_reconciles_and_serves_health_and_metrics(cluster: Cluster):
    liveness, metrics = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        # NOTE: cluster-wide: with --namespace kopf lists /api/v1/namespaces, a path kmock 0.8 cannot parse.
        sys.executable, "-m", "tandem.cli", "operator", "--server", cluster.url, "--all-namespaces",
        "--liveness-host", "127.0.0.1", "--liveness-port", str(liveness),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics), "--resync-seconds", "1",
        "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await cluster.user.create({"apiVersion": LLMD_API, "kind": "LLMDeployment",
                                   "metadata": {"name": "p", "namespace": NAMESPACE}, "spec": {}})
        await eventually(lambda: cluster.obj("apps/v1", "deployments", "p-router"), timeout=30)
        await eventually(lambda: cluster.llmd("p").get("status", {}).get("phase") == "Progressing")
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{liveness}/healthz")
            assert health.status_code == 200
            text = (await http.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert 'tandem:operator_reconciles_total{result="ok"' in text
        assert "tandem:operator_reconcile_duration_seconds_bucket" in text
        assert "process_resident_memory_bytes" in text and "python_gc_collections_total" in text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            raise
    output = (await proc.stdout.read()).decode()
    assert proc.returncode == 0, output
