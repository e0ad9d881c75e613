"""Fixtures for operator tests: the API server emulator on a local port, and the real kopf operator against it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest

import crd_schema
from k8s_emulator import ApiServerEmulator
from operator_support import Cluster, RunningOperator
from tandem.operator.handlers import OperatorOptions, build_registry
from tandem.operator.kube import Credentials, KubeClient
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.reconcile import Reconciler


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with ApiServerEmulator() as api, kmock.Server(api) as server:
        api.add_crd(crd_schema.load_crd())
        url = str(server.url).rstrip("/")
        user = KubeClient(Credentials(server=url))
        try:
            yield Cluster(api=api, url=url, user=user)
        finally:
            await user.aclose()


def _fast(settings: kopf.OperatorSettings) -> None:
    # Seconds, not minutes: short watches, quick batching, quick exit.
    settings.watching.server_timeout = 10
    settings.watching.reconnect_backoff = 0.05
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.posting.level = logging.INFO
    settings.persistence.consistency_timeout = 1.0
    settings.background.instant_exit_timeout = 0.5


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[RunningOperator]:
    """The real kopf operator in its own thread and event loop, as ``kopf.testing.KopfRunner`` runs it.

    NOTE: a thread, not a task: on exit kopf cancels every task of its loop it did not start, which in the
    test's loop would include pytest-asyncio's teardown itself.
    """
    credentials = Credentials(server=cluster.url)
    metrics = OperatorMetrics()
    stop, ready = threading.Event(), threading.Event()
    started: dict[str, Any] = {}

    async def main() -> None:
        client = KubeClient(credentials)
        reconciler = Reconciler(client, metrics)
        started["reconciler"] = reconciler
        registry = build_registry(credentials, reconciler,
                                  OperatorOptions(resync_seconds=0.5, retry_delay=0.2, configure=_fast))
        try:
            await kopf.operator(registry=registry, clusterwide=True, standalone=True,
                                stop_flag=stop, ready_flag=ready)
        finally:
            await client.aclose()

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - surfaced by the fixture's teardown
            started["error"] = e

    thread = threading.Thread(target=thread_main, name="kopf-operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), f"the operator did not start: {started.get('error')!r}"
    try:
        yield RunningOperator(reconciler=started["reconciler"], metrics=metrics)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "the operator did not stop"
        assert "error" not in started, f"the operator failed: {started['error']!r}"
