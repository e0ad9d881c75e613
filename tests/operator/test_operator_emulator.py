"""The API server emulator behaves like an API server where the operator can tell (server-side apply included);
the reconciler applies children under its own field manager."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from operator_support import NAMESPACE, Cluster
from k8s_emulator import labels_match, parse_label_selector
from managed_fields import decode, path_string
from tandem.kube import plain
from tandem.operator.kube import Conflict, KubeClient
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.reconcile import Reconciler
from tandem.operator.render import model_cache_claim

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


def owners(obj: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(manager, operation) -> the fields it owns, as dotted paths."""
    return {(e["manager"], e["operation"]): {path_string(p) for p in decode(e["fieldsV1"])}
            for e in obj["metadata"].get("managedFields") or []}


async def test_server_side_apply_creates_merges_and_tracks_field_managers(cluster: Cluster):
    operator = KubeClient(plain(cluster.url))  # field manager "tandem-operator"
    try:
        desired = configmap("s", {"app": "x"})
        desired["data"] = {"a": "1", "b": "2"}
        created = await operator.apply(desired)  # absent: created
        assert created["metadata"]["uid"] and created["data"] == {"a": "1", "b": "2"}
        assert owners(created) == {("tandem-operator", "Apply"): {".data.a", ".data.b", ".metadata.labels.app"}}

        # Someone edits: takes .data.a and adds an annotation of their own (both theirs now).
        edited = cluster.obj("v1", "configmaps", "s")
        edited["data"]["a"] = "hand"
        edited["metadata"]["annotations"] = {"someone/else": "was here"}
        await cluster.user.replace(edited)
        assert owners(cluster.obj("v1", "configmaps", "s"))[("kubectl", "Update")] == {
            ".data.a", ".metadata.annotations.someone/else"}

        # Without force, an apply that would change their field is a 409 naming the manager and the field.
        with pytest.raises(Conflict, match='conflict with "kubectl": .data.a'):
            await operator.apply(desired, force=False)
        assert cluster.obj("v1", "configmaps", "s")["data"]["a"] == "hand"

        # Forced, as the operator applies: the field comes back, their annotation stays theirs.
        repaired = await operator.apply(desired)
        assert repaired["data"] == {"a": "1", "b": "2"}
        assert repaired["metadata"]["annotations"] == {"someone/else": "was here"}
        assert owners(repaired) == {("tandem-operator", "Apply"): {".data.a", ".data.b", ".metadata.labels.app"},
                                    ("kubectl", "Update"): {".metadata.annotations.someone/else"}}

        # Applying the same again changes nothing, not even resourceVersion.
        again = await operator.apply(desired)
        assert again["metadata"]["resourceVersion"] == repaired["metadata"]["resourceVersion"]

        # A field no longer applied, and owned by nobody else, is removed.
        del desired["data"]["b"]
        shrunk = await operator.apply(desired)
        assert shrunk["data"] == {"a": "1"} and shrunk["metadata"]["annotations"] == {"someone/else": "was here"}
    finally:
        await operator.aclose()


async def test_server_side_apply_merges_lists_keyed_by_name(cluster: Cluster):
    operator = KubeClient(plain(cluster.url))

    def deployment(containers: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "k", "namespace": NAMESPACE},
                "spec": {"selector": {"matchLabels": {"app": "k"}}, "template": {
                    "metadata": {"labels": {"app": "k"}}, "spec": {"containers": containers}}}}

    try:
        await operator.apply(deployment([{"name": "a", "image": "a:1", "args": ["x"]}, {"name": "b", "image": "b:1"}]))
        # Another manager adds a sidecar; our next apply drops "b" and changes "a"'s args (an atomic list).
        live = cluster.obj("apps/v1", "deployments", "k")
        live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "s:1"})
        await cluster.user.replace(live)
        applied = await operator.apply(deployment([{"name": "a", "image": "a:1", "args": ["y", "z"]}]))
        containers = applied["spec"]["template"]["spec"]["containers"]
        assert containers == [{"name": "a", "image": "a:1", "args": ["y", "z"]}, {"name": "sidecar", "image": "s:1"}]
        mine = owners(applied)[("tandem-operator", "Apply")]
        assert '.spec.template.spec.containers[name="a"].args' in mine
        assert not any('[name="b"]' in path for path in mine)
    finally:
        await operator.aclose()


async def test_server_side_apply_refuses_what_a_server_refuses(cluster: Cluster):
    url = f"{cluster.url}{CM_PATH}/z"
    body = json.dumps(configmap("z"))
    async with httpx.AsyncClient() as http:
        no_manager = await http.patch(url, content=body, headers={"Content-Type": "application/apply-patch+yaml"})
        assert no_manager.status_code == 400 and "fieldManager is required" in no_manager.json()["message"]
        wrong_kind = await http.patch(url, params={"fieldManager": "me"},
                                      content=json.dumps({**configmap("z"), "kind": "Secret"}),
                                      headers={"Content-Type": "application/apply-patch+yaml"})
        assert wrong_kind.status_code == 400 and "kind must be" in wrong_kind.json()["message"]
        yaml_body = await http.patch(url, params={"fieldManager": "me"},
                                     content="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: z}\ndata: {k: v}\n",
                                     headers={"Content-Type": "application/apply-patch+yaml"})
        assert yaml_body.status_code == 201, yaml_body.text  # YAML, the apply's own media type
    assert cluster.obj("v1", "configmaps", "z")["data"] == {"k": "v"}


async def test_reconciler_takes_back_hand_edits_and_keeps_other_managers_fields(cluster: Cluster):
    llmd = await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                                      "metadata": {"name": "r", "namespace": NAMESPACE}, "spec": {}})
    metrics = OperatorMetrics()
    client = KubeClient(plain(cluster.url))
    posted: list[tuple[str, str, str]] = []
    events_for = lambda body: lambda t, reason, msg: posted.append((t, reason, msg))  # noqa: E731
    try:
        reconciler = Reconciler(client, metrics)
        await reconciler.reconcile(NAMESPACE, "r", trigger="test", events_for=events_for)
        assert ("Normal", "Created", "Deployment r-decode") in posted
        # A hand edit: replicas (the operator's field) and an annotation (nobody's until now).
        dep = cluster.obj("apps/v1", "deployments", "r-decode")
        dep["spec"]["replicas"] = 9
        dep["metadata"].setdefault("annotations", {})["someone/else"] = "was here"
        await cluster.user.replace(dep)
        posted.clear()
        await reconciler.reconcile(NAMESPACE, "r", trigger="test", events_for=events_for)
        assert [p for p in posted if p[1] == "Updated"] == [("Normal", "Updated", "Deployment r-decode")]
        posted.clear()
        await reconciler.reconcile(NAMESPACE, "r", trigger="test", events_for=events_for)
        assert not [p for p in posted if p[1] in ("Created", "Updated")]  # nothing left to change
    finally:
        await client.aclose()
    dep = cluster.obj("apps/v1", "deployments", "r-decode")
    assert dep["spec"]["replicas"] == 1
    assert dep["metadata"]["annotations"]["someone/else"] == "was here"
    assert ".spec.replicas" in owners(dep)[("tandem-operator", "Apply")]
    assert owners(dep)[("kubectl", "Update")] == {".metadata.annotations.someone/else"}
    assert cluster.llmd("r")["status"]["observedGeneration"] == llmd["metadata"]["generation"]


async def test_concurrent_triggers_coalesce(cluster: Cluster):
    await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                               "metadata": {"name": "q", "namespace": NAMESPACE}, "spec": {}})
    metrics = OperatorMetrics()
    client = KubeClient(plain(cluster.url))
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


async def test_model_cache_claim_is_applied_and_pruned_with_the_spec(cluster: Cluster):
    """An hf:// model with ``model.cache.size`` gets a shared claim owned by the LLMDeployment; a spec that
    stops asking for it has it deleted like any other child."""
    spec = {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "cache": {"size": "20Gi"}}}
    llmd = await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                                      "metadata": {"name": "h", "namespace": NAMESPACE}, "spec": spec})
    claim_name = model_cache_claim("h")
    client = KubeClient(plain(cluster.url))
    try:
        reconciler = Reconciler(client, OperatorMetrics())
        status = await reconciler.reconcile(NAMESPACE, "h", trigger="test", events_for=lambda body: lambda *a: None)
        assert status is not None and status["phase"] != "Degraded", status
        claim = cluster.obj("v1", "persistentvolumeclaims", claim_name)
        assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
        assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == [llmd["metadata"]["uid"]]
        assert ("tandem-operator", "Apply") in owners(claim)

        live = cluster.llmd("h")
        live["spec"]["model"] = {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}
        await cluster.user.replace(live)
        await reconciler.reconcile(NAMESPACE, "h", trigger="test", events_for=lambda body: lambda *a: None)
    finally:
        await client.aclose()
    assert cluster.obj("v1", "persistentvolumeclaims", claim_name) is None
    assert cluster.obj("apps/v1", "deployments", "h-decode") is not None


async def test_replicas_an_autoscaler_sets_are_kept(cluster: Cluster):
    """With ``autoscaling`` the operator does not set the decode Deployment's replicas; the HPA's choice stays."""
    await cluster.user.create({"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
                               "metadata": {"name": "a", "namespace": NAMESPACE},
                               "spec": {"decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}}})
    client = KubeClient(plain(cluster.url))
    hpa = KubeClient(plain(cluster.url), field_manager="horizontal-pod-autoscaler")
    try:
        reconciler = Reconciler(client, OperatorMetrics())
        await reconciler.reconcile(NAMESPACE, "a", trigger="test", events_for=lambda body: lambda *a: None)
        assert cluster.obj("autoscaling/v2", "horizontalpodautoscalers", "a-decode") is not None
        dep = cluster.obj("apps/v1", "deployments", "a-decode")
        dep["spec"]["replicas"] = 3
        await hpa.replace(dep)
        await reconciler.reconcile(NAMESPACE, "a", trigger="test", events_for=lambda body: lambda *a: None)
    finally:
        await client.aclose()
        await hpa.aclose()
    dep = cluster.obj("apps/v1", "deployments", "a-decode")
    assert dep["spec"]["replicas"] == 3
    assert owners(dep)[("horizontal-pod-autoscaler", "Update")] == {".spec.replicas"}
