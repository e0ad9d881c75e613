"""The command each container of an ``LLMDeployment`` runs: Tandem workers, vLLM workers and the router.

Pure, like render (which builds the pods around these commands).
"""

from __future__ import annotations

import json
from typing import Any

from tandem.operator.naming import (
    HTTP_PORT,
    TENANTS_FILE,
    VLLM_KV_EVENTS_PORT,
    VLLM_KV_EVENTS_REPLAY_PORT,
    VLLM_KV_EVENTS_TOPIC,
    redis_url,
    selector_string,
)
from tandem.operator.spec import (
    DEFAULT_KV_CACHE_MEMORY,
    VLLM_CPU_IMAGE,
    VLLM_CUDA_IMAGE,
    LLMDeploymentSpec,
    Role,
    kv_cache_memory_arg,
)


def _serving_flags(spec: LLMDeploymentSpec) -> list[str]:
    """The flags Tandem's servers and ``vllm serve`` spell alike: name, address, dtype, lengths and batch sizes."""
    e, m = spec.engine, spec.model
    return ["--served-model-name", m.served_model_name, "--host", "0.0.0.0", "--port", str(HTTP_PORT),
            "--dtype", m.dtype, "--max-model-len", str(m.max_model_len), "--block-size", str(e.block_size),
            "--max-num-seqs", str(e.max_num_seqs), "--max-num-batched-tokens", str(e.max_num_batched_tokens)]


def _engine_args(spec: LLMDeploymentSpec, device: str) -> list[str]:
    """Flags of ``tandem serve|prefill|decode`` that every worker role shares."""
    e, m = spec.engine, spec.model
    args = ["--model", m.model_arg, *_serving_flags(spec)]
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
    args += ["--max-long-partial-prefills", str(e.max_long_partial_prefills),
             "--long-prefill-token-threshold", str(e.long_prefill_token_threshold)]
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
    args = ["vllm", "serve", model, *_serving_flags(spec)]
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
