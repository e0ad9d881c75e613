"""Typed view of an ``LLMDeployment`` spec: defaults, parsing and the cross-field rules.

The API server applies the CRD's defaults and validations (``crds/tandem.dev_llmdeployments.yaml``)
before the operator sees an object; this module applies the *same* defaults and rules again so that
``render()`` works on a raw dict in unit tests, and so that an object that slipped past validation
(CRD installed without CEL support, an older CRD version) gets a clear ``Invalid`` status instead of
broken children. A test asserts the defaults here equal the CRD's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GROUP = "tandem.dev"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"
API_VERSION = f"{GROUP}/{VERSION}"

BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_NAME_LENGTH = 40  # children add suffixes such as "-prefill"; Service names stop at 63

# Defaults, mirrored by the CRD schema (tests/operator/test_crd.py compares the two).
DEFAULT_IMAGE = "ghcr.io/tandem-llm/tandem:0.1.0"
DEFAULT_IMAGE_PULL_POLICY = "IfNotPresent"
DEFAULT_API_KEY_KEY = "api-key"
DEFAULT_HF_TOKEN_KEY = "token"
DEFAULT_MODEL_URI = "bundled"
DEFAULT_DTYPE = "bfloat16"
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_KV_CACHE_MEMORY = "512Mi"
DEFAULT_PREFILL_REPLICAS = 0
DEFAULT_DECODE_REPLICAS = 1
DEFAULT_ROUTER_REPLICAS = 1
DEFAULT_SERVICE_TYPE = "ClusterIP"
DEFAULT_SCORER_WEIGHTS = (("prefix", 3.0), ("queue", 1.0), ("kv", 1.0), ("inflight", 1.0))
DEFAULT_DISAGG_THRESHOLD = 256
DEFAULT_UCX_TRANSPORTS = ("tcp", "sm")
DEFAULT_KV_PORT = 5600
DEFAULT_LEASE_SECONDS = 30
DEFAULT_LOAD_FAILURE_POLICY = "recompute"
DEFAULT_REDIS_MODE = "Disabled"
DEFAULT_REDIS_IMAGE = "redis:7.4-alpine"
DEFAULT_AUTOSCALING_METRIC = "vllm:num_requests_waiting"
DEFAULT_AUTOSCALING_TARGET = "4"
DEFAULT_MIN_REPLICAS = 1

DTYPES = ("bfloat16", "float32")
BLOCK_SIZES = (8, 16, 32, 64, 128)
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
REDIS_MODES = ("Disabled", "External", "Managed")
LOAD_FAILURE_POLICIES = ("recompute", "fail")
KV_BACKENDS = ("nixl",)
UCX_TRANSPORTS = ("tcp", "sm", "self", "rc", "rc_x", "ud", "ud_x", "dc", "dc_x",
                  "cuda_copy", "cuda_ipc", "gdr_copy", "rocm_copy", "rocm_ipc")

_MODEL_URI = re.compile(
    r"^(?P<bundled>bundled)$"
    r"|^hf://(?P<hf>[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*)$"
    r"|^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/(?P<pvc_path>\S+)$"
    r"|^file://(?P<file>/\S+)$"
)
_KV_MEMORY = re.compile(r"^([1-9][0-9]*(Ki|Mi|Gi|Ti)?|0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$")
_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_METRIC_TARGET = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G)?$")
_REDIS_URL = re.compile(r"^rediss?://\S+$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """An ``LLMDeployment`` spec that breaks the CRD's rules; ``problems`` lists every one found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class SecretKeyRef:
    """A key in a Secret of the deployment's namespace."""

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class Autoscaling:
    """An HPA on one per-pod metric."""

    min_replicas: int
    max_replicas: int
    metric_name: str
    target_average_value: str


@dataclass(frozen=True, slots=True)
class Role:
    """Scheduling and sizing of one pool of pods (prefill, decode or router)."""

    replicas: int
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    autoscaling: Autoscaling | None = None

    @property
    def active(self) -> bool:
        """Whether the pool runs at all (replicas or an autoscaler keep pods around)."""
        return self.replicas >= 1 or self.autoscaling is not None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which model, and how the workers load it."""

    uri: str
    served_name: str | None
    dtype: str
    max_model_len: int
    hf_token: SecretKeyRef | None

    @property
    def scheme(self) -> str:
        """One of ``bundled``, ``hf``, ``pvc``, ``file``."""
        match = _MODEL_URI.match(self.uri)
        assert match is not None  # NOTE: parse_spec rejects every other uri
        return next(k for k in ("bundled", "hf", "claim", "file") if match.group(k)).replace("claim", "pvc")

    @property
    def pvc_claim(self) -> str | None:
        """The claim name of a ``pvc://`` uri."""
        match = _MODEL_URI.match(self.uri)
        return match.group("claim") if match else None

    @property
    def model_arg(self) -> str:
        """The ``--model`` value the workers and the router get."""
        match = _MODEL_URI.match(self.uri)
        assert match is not None
        if match.group("bundled"):
            return BUNDLED_MODEL
        if match.group("hf"):
            return match.group("hf")
        if match.group("claim"):
            return "/models/" + match.group("pvc_path").strip("/")
        return match.group("file")

    @property
    def served_model_name(self) -> str:
        """The name clients send; defaults to the model id, or the last path part for a path."""
        if self.served_name:
            return self.served_name
        if self.scheme in ("bundled", "hf"):
            return self.model_arg
        return self.model_arg.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Engine flags shared by every worker role."""

    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    kv_cache_memory: str  # bytes as decimal digits, or a fraction such as "0.9"


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """The router pool and its scoring."""

    role: Role
    service_type: str
    scorer_weights: tuple[tuple[str, float], ...]
    disagg_threshold: int


@dataclass(frozen=True, slots=True)
class KVTransferSpec:
    """How decode workers pull KV blocks from prefill workers."""

    backend: str
    ucx_transports: tuple[str, ...]
    port: int
    lease_seconds: int
    load_failure_policy: str


@dataclass(frozen=True, slots=True)
class RedisSpec:
    """Where KV events travel: direct streams, an external Redis, or one the operator runs."""

    mode: str
    url: str | None
    image: str
    resources: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LLMDeploymentSpec:
    """A parsed, defaulted and validated ``LLMDeployment.spec``."""

    image: str
    image_pull_policy: str
    image_pull_secrets: tuple[str, ...]
    service_account_name: str | None
    api_key: SecretKeyRef | None
    model: ModelSpec
    engine: EngineSpec
    prefill: Role
    decode: Role
    router: RouterSpec
    kv_transfer: KVTransferSpec
    redis: RedisSpec

    @property
    def disaggregated(self) -> bool:
        """True when a prefill pool exists: the router may then send prompts through a prefill hop."""
        return self.prefill.active


class _Reader:
    """Reads typed fields out of nested dicts, collecting every problem instead of stopping at one."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def obj(self, parent: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problems.append(f"{path}.{key}: must be an object")
            return {}
        return dict(value)

    def int_(self, parent: Mapping[str, Any], key: str, path: str, default: int | None, minimum: int | None = None,
             maximum: int | None = None) -> int | None:
        value = parent.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{path}.{key}: must be an integer, got {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.problems.append(f"{path}.{key}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.problems.append(f"{path}.{key}: must be <= {maximum}, got {value}")
        return value

    def str_(self, parent: Mapping[str, Any], key: str, path: str, default: str | None,
             choices: Sequence[str] | None = None, pattern: re.Pattern[str] | None = None) -> str | None:
        value = parent.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problems.append(f"{path}.{key}: must be a string, got {value!r}")
            return default
        if choices is not None and value not in choices:
            self.problems.append(f"{path}.{key}: unsupported value {value!r} (one of {', '.join(choices)})")
        if pattern is not None and not pattern.match(value):
            self.problems.append(f"{path}.{key}: invalid value {value!r}")
        return value

    def bool_(self, parent: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = parent.get(key, default)
        if not isinstance(value, bool):
            self.problems.append(f"{path}.{key}: must be true or false, got {value!r}")
            return default
        return value

    def list_(self, parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems.append(f"{path}.{key}: must be a list")
            return []
        return list(value)

    def secret(self, parent: Mapping[str, Any], key: str, path: str, default_key: str) -> SecretKeyRef | None:
        if parent.get(key) is None:
            return None
        ref = self.obj(parent, key, path)
        name = self.str_(ref, "name", f"{path}.{key}", None)
        if not name:
            self.problems.append(f"{path}.{key}.name: required")
            return None
        return SecretKeyRef(name=name, key=self.str_(ref, "key", f"{path}.{key}", default_key) or default_key)

    def role(self, spec: Mapping[str, Any], key: str, default_replicas: int, minimum: int) -> Role:
        raw = self.obj(spec, key, "spec")
        path = f"spec.{key}"
        autoscaling = None
        if raw.get("autoscaling") is not None:
            auto = self.obj(raw, "autoscaling", path)
            apath = f"{path}.autoscaling"
            metric = self.obj(auto, "metric", apath)
            lo = self.int_(auto, "minReplicas", apath, DEFAULT_MIN_REPLICAS, minimum=1)
            hi = self.int_(auto, "maxReplicas", apath, None, minimum=1)
            if hi is None:
                self.problems.append(f"{apath}.maxReplicas: required")
                hi = lo
            if lo is not None and hi is not None and lo > hi:
                self.problems.append(f"{apath}: minReplicas ({lo}) must not exceed maxReplicas ({hi})")
            target = metric.get("targetAverageValue", DEFAULT_AUTOSCALING_TARGET)
            if isinstance(target, int) and not isinstance(target, bool):
                target = str(target)
            if not isinstance(target, str) or not _METRIC_TARGET.match(target):
                self.problems.append(f"{apath}.metric.targetAverageValue: invalid quantity {target!r}")
                target = DEFAULT_AUTOSCALING_TARGET
            autoscaling = Autoscaling(
                min_replicas=lo or DEFAULT_MIN_REPLICAS,
                max_replicas=hi or DEFAULT_MIN_REPLICAS,
                metric_name=self.str_(metric, "name", f"{apath}.metric", DEFAULT_AUTOSCALING_METRIC,
                                      pattern=_METRIC_NAME) or DEFAULT_AUTOSCALING_METRIC,
                target_average_value=target,
            )
        extra_args = self.list_(raw, "extraArgs", path)
        if not all(isinstance(a, str) for a in extra_args):
            self.problems.append(f"{path}.extraArgs: must be a list of strings")
        env = self.list_(raw, "env", path)
        if not all(isinstance(e, Mapping) and isinstance(e.get("name"), str) and e["name"] for e in env):
            self.problems.append(f"{path}.env: every entry needs a name")
        return Role(
            replicas=self.int_(raw, "replicas", path, default_replicas, minimum=minimum) or 0,
            resources=self.obj(raw, "resources", path),
            node_selector={str(k): str(v) for k, v in self.obj(raw, "nodeSelector", path).items()},
            tolerations=self.list_(raw, "tolerations", path),
            affinity=self.obj(raw, "affinity", path),
            env=env,
            extra_args=[str(a) for a in extra_args],
            autoscaling=autoscaling,
        )


def kv_cache_memory_arg(value: int | str) -> str:
    """``--kv-cache-memory`` value: bytes as digits (``512Mi`` -> ``536870912``) or a fraction unchanged."""
    text = str(value)
    if not _KV_MEMORY.match(text):
        raise SpecError([f"spec.engine.kvCacheMemory: invalid value {value!r} (bytes, 512Mi, or a fraction like 0.9)"])
    if text[-2:] in _BINARY_SUFFIX:
        return str(int(text[:-2]) * _BINARY_SUFFIX[text[-2:]])
    return text


def validate_name(name: str) -> list[str]:
    """Problems with an ``LLMDeployment``'s own name (the CRD's metadata rule)."""
    if len(name) > MAX_NAME_LENGTH:
        return [f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)"]
    return []


def parse_spec(spec: Mapping[str, Any]) -> LLMDeploymentSpec:
    """Default and validate a raw ``spec`` dict; raises :class:`SpecError` listing every problem."""
    if not isinstance(spec, Mapping):
        raise SpecError(["spec: must be an object"])
    r = _Reader()
    model = r.obj(spec, "model", "spec")
    uri = r.str_(model, "uri", "spec.model", DEFAULT_MODEL_URI) or DEFAULT_MODEL_URI
    if not _MODEL_URI.match(uri):
        r.problems.append(f"spec.model.uri: unsupported model uri {uri!r} "
                          "(use bundled, hf://org/name, pvc://claim/path or file:///path)")
        uri = DEFAULT_MODEL_URI
    engine = r.obj(spec, "engine", "spec")
    block_size = r.int_(engine, "blockSize", "spec.engine", DEFAULT_BLOCK_SIZE) or DEFAULT_BLOCK_SIZE
    if block_size not in BLOCK_SIZES:
        r.problems.append(f"spec.engine.blockSize: unsupported value {block_size} (one of {BLOCK_SIZES})")
    batched = r.int_(engine, "maxNumBatchedTokens", "spec.engine", DEFAULT_MAX_NUM_BATCHED_TOKENS, minimum=1) or 1
    if batched < block_size:
        r.problems.append("spec.engine: maxNumBatchedTokens must be at least blockSize")
    try:
        kv_memory = kv_cache_memory_arg(engine.get("kvCacheMemory", DEFAULT_KV_CACHE_MEMORY))
    except SpecError as e:
        r.problems.extend(e.problems)
        kv_memory = kv_cache_memory_arg(DEFAULT_KV_CACHE_MEMORY)

    prefill = r.role(spec, "prefill", DEFAULT_PREFILL_REPLICAS, minimum=0)
    if prefill.autoscaling is not None and prefill.replicas < 1:
        r.problems.append("spec.prefill: prefill.autoscaling needs prefill.replicas >= 1 "
                          "(replicas 0 means aggregated serving)")
    decode = r.role(spec, "decode", DEFAULT_DECODE_REPLICAS, minimum=0)
    router_raw = r.obj(spec, "router", "spec")
    weights_raw = r.obj(router_raw, "scorerWeights", "spec.router")
    weights = []
    for name, default in DEFAULT_SCORER_WEIGHTS:
        w = weights_raw.get(name, default)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            r.problems.append(f"spec.router.scorerWeights.{name}: must be a number >= 0, got {w!r}")
            w = default
        weights.append((name, float(w)))
    for unknown in set(weights_raw) - {n for n, _ in DEFAULT_SCORER_WEIGHTS}:
        r.problems.append(f"spec.router.scorerWeights.{unknown}: unknown scorer")
    router = RouterSpec(
        role=r.role(spec, "router", DEFAULT_ROUTER_REPLICAS, minimum=1),
        service_type=r.str_(router_raw, "serviceType", "spec.router", DEFAULT_SERVICE_TYPE,
                            choices=SERVICE_TYPES) or DEFAULT_SERVICE_TYPE,
        scorer_weights=tuple(weights),
        disagg_threshold=r.int_(router_raw, "disaggThreshold", "spec.router", DEFAULT_DISAGG_THRESHOLD,
                                minimum=0) or 0,
    )
    kv = r.obj(spec, "kvTransfer", "spec")
    transports = kv.get("ucxTransports", list(DEFAULT_UCX_TRANSPORTS))
    if not isinstance(transports, list) or not transports or any(t not in UCX_TRANSPORTS for t in transports):
        r.problems.append(f"spec.kvTransfer.ucxTransports: unsupported {transports!r} (from {', '.join(UCX_TRANSPORTS)})")
        transports = list(DEFAULT_UCX_TRANSPORTS)
    redis = r.obj(spec, "redis", "spec")
    redis_mode = r.str_(redis, "mode", "spec.redis", DEFAULT_REDIS_MODE, choices=REDIS_MODES) or DEFAULT_REDIS_MODE
    redis_url = r.str_(redis, "url", "spec.redis", None, pattern=_REDIS_URL)
    if redis_mode == "External" and not redis_url:
        r.problems.append("spec.redis: redis.url is required when redis.mode is External")
    if redis_url and redis_mode != "External":
        r.problems.append("spec.redis: redis.url is only used when redis.mode is External")
    sa = r.str_(spec, "serviceAccountName", "spec", None)
    if sa is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", sa):
        r.problems.append(f"spec.serviceAccountName: invalid name {sa!r}")
    pull_secrets = []
    for entry in r.list_(spec, "imagePullSecrets", "spec"):
        if not isinstance(entry, Mapping) or not entry.get("name"):
            r.problems.append("spec.imagePullSecrets: every entry needs a name")
        else:
            pull_secrets.append(str(entry["name"]))
    if prefill.active and not decode.active:
        r.problems.append("spec.decode: a disaggregated deployment needs decode replicas >= 1")

    result = LLMDeploymentSpec(
        image=r.str_(spec, "image", "spec", DEFAULT_IMAGE) or DEFAULT_IMAGE,
        image_pull_policy=r.str_(spec, "imagePullPolicy", "spec", DEFAULT_IMAGE_PULL_POLICY,
                                 choices=PULL_POLICIES) or DEFAULT_IMAGE_PULL_POLICY,
        image_pull_secrets=tuple(pull_secrets),
        service_account_name=sa,
        api_key=r.secret(spec, "apiKeySecretRef", "spec", DEFAULT_API_KEY_KEY),
        model=ModelSpec(
            uri=uri,
            served_name=r.str_(model, "servedName", "spec.model", None),
            dtype=r.str_(model, "dtype", "spec.model", DEFAULT_DTYPE, choices=DTYPES) or DEFAULT_DTYPE,
            max_model_len=r.int_(model, "maxModelLen", "spec.model", DEFAULT_MAX_MODEL_LEN, minimum=16) or 16,
            hf_token=r.secret(model, "hfTokenSecretRef", "spec.model", DEFAULT_HF_TOKEN_KEY),
        ),
        engine=EngineSpec(
            block_size=block_size,
            max_num_seqs=r.int_(engine, "maxNumSeqs", "spec.engine", DEFAULT_MAX_NUM_SEQS, minimum=1,
                                maximum=4096) or 1,
            max_num_batched_tokens=batched,
            enable_prefix_caching=r.bool_(engine, "enablePrefixCaching", "spec.engine", True),
            enable_chunked_prefill=r.bool_(engine, "enableChunkedPrefill", "spec.engine", True),
            kv_cache_memory=kv_memory,
        ),
        prefill=prefill,
        decode=decode,
        router=router,
        kv_transfer=KVTransferSpec(
            backend=r.str_(kv, "backend", "spec.kvTransfer", "nixl", choices=KV_BACKENDS) or "nixl",
            ucx_transports=tuple(transports),
            port=r.int_(kv, "port", "spec.kvTransfer", DEFAULT_KV_PORT, minimum=1024, maximum=65535)
            or DEFAULT_KV_PORT,
            lease_seconds=r.int_(kv, "leaseSeconds", "spec.kvTransfer", DEFAULT_LEASE_SECONDS, minimum=1,
                                 maximum=3600) or DEFAULT_LEASE_SECONDS,
            load_failure_policy=r.str_(kv, "loadFailurePolicy", "spec.kvTransfer", DEFAULT_LOAD_FAILURE_POLICY,
                                       choices=LOAD_FAILURE_POLICIES) or DEFAULT_LOAD_FAILURE_POLICY,
        ),
        redis=RedisSpec(
            mode=redis_mode,
            url=redis_url,
            image=r.str_(redis, "image", "spec.redis", DEFAULT_REDIS_IMAGE) or DEFAULT_REDIS_IMAGE,
            resources=r.obj(redis, "resources", "spec.redis"),
        ),
    )
    if r.problems:
        raise SpecError(r.problems)
    return result
