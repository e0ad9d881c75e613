"""Names, labels, ports and in-cluster addresses of an ``LLMDeployment``'s children: what render, the reconcile
loop and the routers' selectors must agree on."""

from __future__ import annotations

from tandem.operator.spec import LLMDeploymentSpec

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
