"""The API server emulator behaves like an API server where the operator can tell; the reconciler retries 409s."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from operator_support import NAMESPACE, Cluster
from k8s_emulator import labels_match, parse_label_selector
from tandem.operator.kube import Conflict, KubeClient
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.reconcile import Reconciler

CM_PATH = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
LLMD_PATH = f"/apis/tandem.dev/v1alpha1/namespaces/{NAMESPACE}/llmdeployments"


def configmap(name: str, labels: dict[str, str] | None = None, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                    "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


async def test_system_fields_and_generation(cluster: Cluster):
    created = await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                                         "metadata": {"name": "m", "namespace": NAMESPACE}, "spec": {}, "status": {"phase": "Ready"}})
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert "status" not in created  # status only through /status
    assert created["spec"]["decode"] == {"replicas": 1}  # CRD defaults applied
    status = await cluster.user.patch_status("tandem.dev/v1alpha1", "LLMDeployment", NAMESPACE, "m",
                                             {"phase": "Ready"})
    assert status["metadata"]["generation"] == 1 and status["status"]["phase"] == "Ready"
    assert int(status["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    # A spec write bumps generation; status sent with it is ignored.
    status["spec"]["decode"]["replicas"] = 2
    status["status"] = {"phase": "Invalid"}
    updated = await cluster.user.replace(status)
    assert updated["metadata"]["generation"] == 2 and updated["status"]["phase"] == "Ready"
    # A no-op write changes nothing, not even resourceVersion.
    same = await cluster.user.replace(updated)
    assert same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]


async def test_stale_resource_version_is_a_409(cluster: Cluster):
    first = await cluster.user.create(configmap("c"))
    second = dict(first, data={"k": "new"})
    await cluster.user.replace(second)
    with pytest.raises(Conflict):
        await cluster.user.replace(dict(first, data={"k": "stale"}))
    with pytest.raises(Conflict):
        await cluster.user.create(configmap("c"))
    assert cluster.obj("v1", "configmaps", "c")["data"] == {"k": "new"}


async def test_label_selectors():
    reqs = parse_label_selector("tandem.dev/role in (prefill,decode),!canary,tier!=gold,app")
    assert labels_match({"tandem.dev/role": "decode", "app": "x"}, reqs)
    assert not labels_match({"tandem.dev/role": "router", "app": "x"}, reqs)
    assert not labels_match({"tandem.dev/role": "decode", "app": "x", "canary": "1"}, reqs)
    assert not labels_match({"tandem.dev/role": "decode", "app": "x", "tier": "gold"}, reqs)
    assert not labels_match({"tandem.dev/role": "decode"}, reqs)


async def test_list_by_label_selector_and_watch_from_resource_version(cluster: Cluster):
    await cluster.user.create(configmap("a", {"role": "prefill"}))
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        listing = (await http.get(CM_PATH, params={"labelSelector": "role=decode"})).json()
        assert listing["items"] == []
        since = listing["metadata"]["resourceVersion"]
        await cluster.user.create(configmap("b", {"role": "decode"}))
        await cluster.user.create(configmap("c", {"role": "prefill"}))
        events = []
        async with http.stream("GET", CM_PATH, params={"watch": "true", "resourceVersion": since,
                                                       "labelSelector": "role=decode", "timeoutSeconds": "1"}) as r:
            async for line in r.aiter_lines():
                if line.strip():
                    events.append(json.loads(line))
    # Only what happened after the listing, and only what matches the selector.
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


async def test_garbage_collection_and_finalizers(cluster: Cluster):
    owner = await cluster.user.create(configmap("owner"))
    child = await cluster.user.create(configmap("child", owner=owner))
    await cluster.user.create(configmap("grandchild", owner=child))
    blocked = configmap("blocked", owner=owner)
    blocked["metadata"]["finalizers"] = ["example.com/hold"]
    await cluster.user.create(blocked)
    await cluster.user.delete("v1", "ConfigMap", NAMESPACE, "owner")
    assert cluster.obj("v1", "configmaps", "child") is None
    assert cluster.obj("v1", "configmaps", "grandchild") is None
    held = cluster.obj("v1", "configmaps", "blocked")
    assert held["metadata"]["deletionTimestamp"]  # waiting for its finalizer
    held["metadata"]["finalizers"] = []
    await cluster.user.replace(held)
    assert cluster.obj("v1", "configmaps", "blocked") is None


async def test_scale_subresource(cluster: Cluster):
    await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                               "metadata": {"name": "m", "namespace": NAMESPACE}, "spec": {"decode": {"replicas": 2}}})
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        scale = (await http.get(f"{LLMD_PATH}/m/scale")).json()
        assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 2
        r = await http.patch(f"{LLMD_PATH}/m/scale", json={"spec": {"replicas": -1}},
                             headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 422
    assert cluster.llmd("m")["spec"]["decode"]["replicas"] == 2


class RacingClient(KubeClient):
    """A client whose first replace loses a race: someone else writes the object just before it."""

    def __init__(self, *args: Any, rival: KubeClient, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rival = rival
        self.raced = False

    async def replace(self, obj):
        if not self.raced:
            self.raced = True
            live = await self.rival.get(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"],
                                        obj["metadata"]["name"])
            live["metadata"].setdefault("annotations", {})["someone/else"] = "was here"
            await self.rival.replace(live)
        return await super().replace(obj)


async def test_reconciler_retries_a_409_and_keeps_others_annotations(cluster: Cluster):
    llmd = await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                                      "metadata": {"name": "r", "namespace": NAMESPACE}, "spec": {}})
    metrics = OperatorMetrics()
    client = RacingClient(cluster.user.credentials, rival=cluster.user)
    try:
        reconciler = Reconciler(client, metrics)
        posted: list[tuple[str, str, str]] = []
        events_for = lambda body: lambda t, reason, msg: posted.append((t, reason, msg))  # noqa: E731
        await reconciler.reconcile(NAMESPACE, "r", trigger="test", events_for=events_for)
        # Drift on the decode Deployment, then reconcile again: the repair meets a 409 first.
        dep = cluster.obj("apps/v1", "deployments", "r-decode")
        dep["spec"]["replicas"] = 9
        await cluster.user.replace(dep)
        await reconciler.reconcile(NAMESPACE, "r", trigger="test", events_for=events_for)
    finally:
        await client.aclose()
    dep = cluster.obj("apps/v1", "deployments", "r-decode")
    assert client.raced and metrics.value("tandem:operator_conflicts_total") == 1
    assert dep["spec"]["replicas"] == 1
    assert dep["metadata"]["annotations"]["someone/else"] == "was here"
    assert ("Normal", "Updated", "Deployment r-decode") in posted
    assert cluster.llmd("r")["status"]["observedGeneration"] == llmd["metadata"]["generation"]


async def test_concurrent_triggers_coalesce(cluster: Cluster):
    await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                               "metadata": {"name": "q", "namespace": NAMESPACE}, "spec": {}})
    metrics = OperatorMetrics()
    client = KubeClient(cluster.user.credentials)
    try:
        reconciler = Reconciler(client, metrics)
        results = await asyncio.gather(*[reconciler.reconcile(NAMESPACE, "q", trigger="burst",
                                                              events_for=lambda body: lambda *a: None)
                                         for _ in range(5)])
    finally:
        await client.aclose()
    # One runs, one queues behind it (and reads fresh state), the other three are covered by the queued one.
    assert sum(r is not None for r in results) == 2
    assert metrics.value("tandem:operator_reconciles_total", {"trigger": "burst", "result": "ok"}) == 2
