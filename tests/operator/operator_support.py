"""Helpers shared by the operator tests: the cluster handle, the operator handle, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from k8s_emulator import ApiServerEmulator
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
