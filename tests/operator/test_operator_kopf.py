"""The real kopf operator against the API server emulator: create, scale, update, drift, delete, status, scope."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from operator_support import LLMD_API, NAMESPACE, Cluster, RunningOperator, eventually, running_operator
from tandem.operator.kube import Conflict
from tandem.operator.render import render

DISAGG_SPEC: dict[str, Any] = {
    "apiKeySecretRef": {"name": "keys"},
    "prefill": {"replicas": 1},
    "decode": {"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
    "redis": {"mode": "Managed"},
}


def new_llmd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": LLMD_API, "kind": "LLMDeployment", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec}


async def edit(cluster: Cluster, api_version: str, plural: str, name: str,
               change: Callable[[dict[str, Any]], None]) -> None:
    """Edit an object as `kubectl edit` does: read, change, write the whole object; re-read on 409."""
    for _ in range(10):
        live = cluster.obj(api_version, plural, name)
        change(live)
        try:
            await cluster.user.replace(live)
            return
        except Conflict:
            continue
    raise AssertionError("the edit kept conflicting")


async def replace_spec(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    await edit(cluster, LLMD_API, "llmdeployments", name, lambda obj: obj.update(spec=spec))


def children(cluster: Cluster, name: str) -> set[tuple[str, str]]:
    """(kind, name) of every object in the namespace labelled as a child of ``name``."""
    found = set()
    for api_version, plural in [("v1", "configmaps"), ("v1", "services"), ("v1", "serviceaccounts"),
                                ("apps/v1", "deployments"), ("autoscaling/v2", "horizontalpodautoscalers"),
                                ("policy/v1", "poddisruptionbudgets"), ("rbac.authorization.k8s.io/v1", "roles"),
                                ("rbac.authorization.k8s.io/v1", "rolebindings")]:
        for obj in cluster.api.list_objects(api_version, plural, NAMESPACE):
            if (obj["metadata"].get("labels") or {}).get("tandem.dev/deployment") == name:
                found.add((obj["kind"], obj["metadata"]["name"]))
    return found


def expected_children(cluster: Cluster, name: str) -> set[tuple[str, str]]:
    return {(m["kind"], m["metadata"]["name"]) for m in render(cluster.llmd(name))}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == ctype)


async def make_ready(cluster: Cluster, name: str, roles: list[str]) -> None:
    """Play the deployment controller: every role's pods are up and ready."""
    for role in roles:
        dep = await eventually(lambda: cluster.obj("apps/v1", "deployments", f"{name}-{role}"))
        replicas = dep["spec"].get("replicas", 1)
        await cluster.api.set_status("apps/v1", "deployments", NAMESPACE, f"{name}-{role}", {
            "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
            "availableReplicas": replicas, "observedGeneration": dep["metadata"]["generation"]})


async def test_create_reconciles_children_owner_refs_status_and_events(cluster: Cluster, operator: RunningOperator):
    created = await cluster.user.create(new_llmd("m", DISAGG_SPEC))
    uid = created["metadata"]["uid"]
    await eventually(lambda: children(cluster, "m") == expected_children(cluster, "m"))
    kinds = {k for k, _ in children(cluster, "m")}
    assert kinds == {"ConfigMap", "Service", "ServiceAccount", "Deployment", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "Role", "RoleBinding"}
    for kind, child in children(cluster, "m"):
        plural = {"Deployment": ("apps/v1", "deployments"), "Service": ("v1", "services")}.get(kind)
        if plural:
            refs = cluster.obj(*plural, child)["metadata"]["ownerReferences"]
            assert [r["uid"] for r in refs] == [uid]

    status = (await eventually(lambda: cluster.llmd("m").get("status", {}).get("phase") == "Progressing"
                               and cluster.llmd("m")))["status"]
    assert status["mode"] == "disaggregated"
    assert status["endpoint"] == f"http://m.{NAMESPACE}.svc.cluster.local:8000/v1"
    assert status["prefill"]["ready"] == "0/1" and status["observedGeneration"] == 1
    assert condition(cluster.llmd("m"), "Ready")["status"] == "False"
    # No finalizer: deleting works even while the operator is down (owner references do the cleanup).
    assert not cluster.llmd("m")["metadata"].get("finalizers")

    await make_ready(cluster, "m", ["prefill", "decode", "router"])
    ready = await eventually(lambda: cluster.llmd("m")["status"]["phase"] == "Ready" and cluster.llmd("m"))
    assert condition(ready, "Ready") | {"lastTransitionTime": None} == {
        "type": "Ready", "status": "True", "reason": "AllReplicasReady", "lastTransitionTime": None,
        "message": "every role has all replicas ready", "observedGeneration": 1}
    assert condition(ready, "Degraded")["status"] == "False"
    assert ready["status"]["decode"] == {"replicas": 1, "readyReplicas": 1, "ready": "1/1",
                                         "selector": "tandem.dev/deployment=m,tandem.dev/role=decode"}

    reasons = await eventually(lambda: {e["reason"] for e in cluster.events("m")} >= {"Created", "PhaseReady"}
                               and {e["reason"] for e in cluster.events("m")})
    assert "PhaseProgressing" in reasons
    assert operator.metrics.total("tandem:operator_reconciles_total", result="ok") >= 1
    assert operator.metrics.value("tandem:operator_child_actions_total",
                                  {"kind": "Deployment", "action": "created"}) == 4
    assert operator.metrics.value("tandem:operator_reconcile_duration_seconds_count") >= 1


async def test_scale_subresource_scales_the_decode_pool(cluster: Cluster, operator: RunningOperator):
    await cluster.user.create(new_llmd("s", {}))
    await eventually(lambda: cluster.obj("apps/v1", "deployments", "s-decode"))
    await make_ready(cluster, "s", ["decode", "router"])
    await eventually(lambda: cluster.llmd("s")["status"]["phase"] == "Ready")

    # What `kubectl scale` (and an HPA on the LLMDeployment) does.
    scale_url = f"{cluster.url}/apis/{LLMD_API}/namespaces/{NAMESPACE}/llmdeployments/s/scale"
    async with httpx.AsyncClient() as http:
        scale = (await http.get(scale_url)).json()
        assert scale["spec"]["replicas"] == 1 and scale["status"]["selector"] == "tandem.dev/deployment=s,tandem.dev/role=decode"
        scaled = await http.patch(scale_url, json={"spec": {"replicas": 3}},
                                  headers={"Content-Type": "application/merge-patch+json"})
        assert scaled.status_code == 200, scaled.text
    await eventually(lambda: cluster.obj("apps/v1", "deployments", "s-decode")["spec"]["replicas"] == 3)
    status = (await eventually(lambda: cluster.llmd("s")["status"].get("observedGeneration") == 2
                               and cluster.llmd("s")))["status"]
    assert status["phase"] == "Progressing" and status["decode"]["ready"] == "1/3"
    await make_ready(cluster, "s", ["decode"])
    await eventually(lambda: cluster.llmd("s")["status"]["phase"] == "Ready")


async def test_spec_update_rolls_workers_and_prunes_what_is_no_longer_asked(cluster: Cluster,
                                                                            operator: RunningOperator):
    await cluster.user.create(new_llmd("u", DISAGG_SPEC))
    await eventually(lambda: ("Deployment", "u-redis") in children(cluster, "u")
                     and ("HorizontalPodAutoscaler", "u-decode") in children(cluster, "u"))
    before = cluster.obj("apps/v1", "deployments", "u-decode")

    await replace_spec(cluster, "u", {"apiKeySecretRef": {"name": "keys"}, "decode": {"replicas": 2},
                                      "model": {"servedName": "renamed"}})

    await eventually(lambda: children(cluster, "u") == expected_children(cluster, "u"))
    gone = {("Deployment", "u-prefill"), ("Service", "u-prefill"), ("PodDisruptionBudget", "u-prefill"),
            ("Deployment", "u-redis"), ("Service", "u-redis"), ("HorizontalPodAutoscaler", "u-decode")}
    assert not gone & children(cluster, "u")
    after = cluster.obj("apps/v1", "deployments", "u-decode")
    cmd = after["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["tandem", "serve"] and cmd[cmd.index("--served-model-name") + 1] == "renamed"
    assert "--kv-events-redis" not in cmd
    assert after["spec"]["replicas"] == 2
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # updated in place: a rolling update
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert after["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    status = (await eventually(lambda: cluster.llmd("u")["status"].get("observedGeneration") == 2
                               and cluster.llmd("u")))["status"]
    assert status["mode"] == "aggregated" and "prefill" not in status
    assert "Deleted" in {e["reason"] for e in cluster.events("u")}


async def test_drift_is_repaired(cluster: Cluster, operator: RunningOperator):
    await cluster.user.create(new_llmd("d", {}))
    await eventually(lambda: children(cluster, "d") == expected_children(cluster, "d"))

    # A hand edit of a child comes back.
    def hand_edit(dep: dict[str, Any]) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["sleep", "infinity"]
        dep["spec"]["replicas"] = 7

    await edit(cluster, "apps/v1", "deployments", "d-decode", hand_edit)
    await eventually(lambda: cluster.obj("apps/v1", "deployments", "d-decode")["spec"]["template"]["spec"]
                     ["containers"][0]["command"][:2] == ["tandem", "serve"])
    assert cluster.obj("apps/v1", "deployments", "d-decode")["spec"]["replicas"] == 1

    # A deleted child comes back (a new object).
    old_uid = cluster.obj("v1", "services", "d")["metadata"]["uid"]
    await cluster.user.delete("v1", "Service", NAMESPACE, "d")
    await eventually(lambda: (cluster.obj("v1", "services", "d") or {}).get("metadata", {}).get("uid")
                     not in (None, old_uid))
    assert operator.metrics.value("tandem:operator_child_actions_total", {"kind": "Service", "action": "updated"}) == 0
    assert operator.metrics.value("tandem:operator_child_actions_total", {"kind": "Deployment", "action": "updated"}) >= 1


async def test_delete_collects_every_child(cluster: Cluster, operator: RunningOperator):
    await cluster.user.create(new_llmd("g", DISAGG_SPEC))
    await eventually(lambda: children(cluster, "g") == expected_children(cluster, "g"))
    await cluster.user.delete(LLMD_API, "LLMDeployment", NAMESPACE, "g")
    await eventually(lambda: cluster.llmd("g") is None and children(cluster, "g") == set())
    # And nothing comes back from a late timer or child event.
    await asyncio.sleep(1.0)
    assert children(cluster, "g") == set() and cluster.llmd("g") is None


async def test_invalid_spec_sets_condition_and_warning_event_and_creates_nothing(cluster: Cluster,
                                                                                  operator: RunningOperator):
    # The emulator runs no CEL, like a cluster whose CRD lacks the rules: the operator must catch it.
    await cluster.user.create(new_llmd("bad", {"redis": {"mode": "External"}}))
    obj = await eventually(lambda: cluster.llmd("bad").get("status", {}).get("phase") == "Invalid"
                           and cluster.llmd("bad"))
    degraded = condition(obj, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "redis.url is required" in degraded["message"]
    assert condition(obj, "Ready")["status"] == "False"
    await eventually(lambda: any(e["reason"] == "InvalidSpec" and e["type"] == "Warning"
                                 for e in cluster.events("bad")))
    assert children(cluster, "bad") == set()
    await asyncio.sleep(1.2)  # two resync rounds: the same problem is not reported again
    assert sum(e["reason"] == "InvalidSpec" for e in cluster.events("bad")) == 1
    assert operator.metrics.value("tandem:operator_reconcile_errors_total", {"reason": "InvalidSpec"}) >= 1

    # Fixing the spec recovers.
    await replace_spec(cluster, "bad", {"redis": {"mode": "External", "url": "redis://r.infra:6379/0"}})
    await eventually(lambda: cluster.llmd("bad")["status"]["phase"] == "Progressing")
    assert condition(cluster.llmd("bad"), "Degraded")["status"] == "False"


async def test_failed_rollout_is_degraded(cluster: Cluster, operator: RunningOperator):
    await cluster.user.create(new_llmd("f", {}))
    await eventually(lambda: cluster.obj("apps/v1", "deployments", "f-decode"))
    await cluster.api.set_status("apps/v1", "deployments", NAMESPACE, "f-decode", {"conditions": [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "quota exceeded"}]})
    obj = await eventually(lambda: cluster.llmd("f")["status"]["phase"] == "Degraded" and cluster.llmd("f"))
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "DeploymentFailed" and "quota exceeded" in degraded["message"]
    await eventually(lambda: any(e["reason"] == "PhaseDegraded" for e in cluster.events("f")))


async def test_foreign_object_with_a_child_name_is_left_alone(cluster: Cluster, operator: RunningOperator):
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o-config", "namespace": NAMESPACE},
               "data": {"mine": "yes"}}
    await cluster.user.create(foreign)
    await cluster.user.create(new_llmd("o", {}))
    obj = await eventually(lambda: cluster.llmd("o").get("status", {}).get("phase") == "Degraded"
                           and cluster.llmd("o"))
    assert condition(obj, "Degraded")["reason"] == "OwnershipConflict"
    assert cluster.obj("v1", "configmaps", "o-config")["data"] == {"mine": "yes"}
    assert cluster.obj("apps/v1", "deployments", "o-decode") is not None  # the rest is still reconciled


@pytest.mark.parametrize("watch", [NAMESPACE, "te*"])
async def test_an_operator_scoped_to_one_namespace_leaves_the_others_alone(cluster: Cluster, watch: str):
    """``tandem operator --namespace team`` (the chart's ``operator.watchNamespaces``; globs allowed): an
    LLMDeployment in another namespace gets no children and no status, while the watched one is reconciled."""
    for namespace in (NAMESPACE, "other"):  # kopf serves the watched namespaces it sees listed
        await cluster.user.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    elsewhere = {**new_llmd("x", {}), "metadata": {"name": "x", "namespace": "other"}}
    async with running_operator(cluster, namespaces=[watch]):
        await cluster.user.create(elsewhere)
        await cluster.user.create(new_llmd("w", {}))
        await eventually(lambda: children(cluster, "w") == expected_children(cluster, "w"))
        await eventually(lambda: cluster.llmd("w").get("status", {}).get("phase") == "Progressing")
        await asyncio.sleep(1.5)  # three resync periods: time enough to have touched "other" if it watched it
        other = cluster.obj(LLMD_API, "llmdeployments", "x", namespace="other")
        assert "status" not in other and not (other["metadata"].get("annotations") or {})
        for api_version, plural in [("v1", "configmaps"), ("v1", "services"), ("apps/v1", "deployments")]:
            assert cluster.api.list_objects(api_version, plural, "other") == [], plural
