"""Helpers shared by the operator tests: the cluster handle, the operator handle, polling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from k8s_emulator import ApiServerEmulator
from tandem.kube import KubeConnection, plain
from tandem.operator.handlers import OperatorOptions, build_registry
from tandem.operator.kube import KubeClient
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.reconcile import Reconciler

NAMESPACE = "team"
LLMD_API = "tandem.dev/v1alpha1"


@dataclass
class Cluster:
    """The emulator, its URL, and a client playing the user (kubectl)."""

    api: ApiServerEmulator
    url: str
    user: KubeClient

    def obj(self, api_version: str, plural: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.api.get_object(api_version, plural, namespace, name)

    def llmd(self, name: str) -> dict[str, Any] | None:
        return self.obj(LLMD_API, "llmdeployments", name)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.api.list_objects("v1", "events", NAMESPACE)
                if e.get("involvedObject", {}).get("name") == name]


@dataclass
class RunningOperator:
    """The operator's reconciler and metrics, for assertions."""

    reconciler: Reconciler
    metrics: OperatorMetrics


async def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy without raising; fail with its last complaint."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = AssertionError(f"still falsy: {result!r}")
        except (AssertionError, KeyError, TypeError) as e:
            last = e
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s: {last}")


def _fast(settings: kopf.OperatorSettings) -> None:
    # Seconds, not minutes: short watches, quick batching, quick exit.
    settings.watching.server_timeout = 10
    settings.watching.reconnect_backoff = 0.05
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    settings.posting.level = logging.INFO
    settings.persistence.consistency_timeout = 1.0
    settings.background.instant_exit_timeout = 0.5


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster, namespaces: list[str] | None = None,
                           connect: Callable[[], Awaitable[KubeConnection]] | None = None,
                           ) -> AsyncIterator[RunningOperator]:
    """The real kopf operator in its own thread and event loop, as ``kopf.testing.KopfRunner`` runs it: over
    the whole cluster, or over ``namespaces`` only (``tandem operator --namespace``); connected as
    ``connect`` says (default: the emulator's URL, no credentials), for kopf and for its own client.

    NOTE: a thread, not a task: on exit kopf cancels every task of its loop it did not start, which in the
    test's loop would include pytest-asyncio's teardown itself.
    """
    async def plain_connection() -> KubeConnection:
        return plain(cluster.url)

    connect = connect or plain_connection
    metrics = OperatorMetrics()
    stop, ready = threading.Event(), threading.Event()
    started: dict[str, Any] = {}

    async def main() -> None:
        client = KubeClient(await connect(), reconnect=connect)
        reconciler = Reconciler(client, metrics)
        started["reconciler"] = reconciler
        registry = build_registry(connect, reconciler,
                                  OperatorOptions(resync_seconds=0.5, retry_delay=0.2, configure=_fast))
        try:
            await kopf.operator(registry=registry, clusterwide=not namespaces, namespaces=namespaces or (),
                                standalone=True, stop_flag=stop, ready_flag=ready)
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
