"""Router configuration: one validated dataclass built from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field

# Scorer names accepted in ``--scorer-weights``.
SCORER_NAMES = ("prefix", "queue", "kv", "inflight")

# Prefill and aggregated workers are picked mainly by prefix hits; decode workers mainly by load.
DEFAULT_PREFILL_WEIGHTS = {"prefix": 3.0, "queue": 1.0, "kv": 1.0, "inflight": 1.0}
DEFAULT_DECODE_WEIGHTS = {"prefix": 1.0, "queue": 1.0, "kv": 1.0, "inflight": 2.0}


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``prefix=3,queue=1`` into a weight map; unknown names or negative weights are errors."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in SCORER_NAMES:
            raise ValueError(f"bad scorer weight {item!r}: expected NAME=WEIGHT with NAME in {', '.join(SCORER_NAMES)}")
        weight = float(value)
        if weight < 0:
            raise ValueError(f"scorer weight {item!r} must be >= 0")
        weights[name] = weight
    return weights


@dataclass(slots=True)
class RouterConfig:
    """Everything the router app needs. Worker URLs are the workers' advertised identities."""

    served_model_name: str
    model: str | None = None
    tokenizer_dir: str | None = None
    api_keys: tuple[str, ...] = ()
    redis_url: str | None = None
    prefill_urls: tuple[str, ...] = ()
    decode_urls: tuple[str, ...] = ()
    worker_urls: tuple[str, ...] = ()
    # vLLM workers (kind "vllm"): "URL[,kv-events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]" (default: the URL's
    # host on vllm_kv_events_port, no replay).
    vllm_prefill_urls: tuple[str, ...] = ()
    vllm_decode_urls: tuple[str, ...] = ()
    vllm_worker_urls: tuple[str, ...] = ()
    vllm_kv_events_port: int = 5557
    # Port of vLLM workers' replay socket on their host, for workers not given one of their own (None: no replay).
    vllm_kv_events_replay_port: int | None = None
    vllm_kv_events_topic: str = "kv-events"
    prefill_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREFILL_WEIGHTS))
    decode_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DECODE_WEIGHTS))
    # Below this many prompt tokens not already cached on the chosen decode worker, the prefill hop
    # costs more than it saves and the decode worker serves the request alone (llm-d's P/D decider).
    disagg_threshold: int = 256
    kv_event_ttl_s: float = 10.0
    max_retries: int = 2
    # Mid-stream failures resumed on another worker per request (0: a failed stream ends with an error event).
    max_migrations: int = 2
    # A stream that sends nothing for this long is treated as failed (and migrated).
    stream_stall_timeout_s: float = 60.0
    # Outlier ejection: the n-th consecutive ejection lasts base x n seconds, capped (see workers.OutlierPolicy).
    outlier_base_ejection_s: float = 5.0
    outlier_max_ejection_s: float = 120.0
    outlier_consecutive_5xx: int = 3
    # Overload: when every eligible worker has this many requests queued, answer 429 at once (None: no bound).
    max_queue_per_worker: int | None = None
    overload_retry_after_s: int = 1
    # Tenants (API key -> tenant and limits), a file the router watches; limits shared through this Redis
    # (default: redis_url), else per replica.
    tenants_file: str | None = None
    ratelimit_redis_url: str | None = None
    retry_backoff_s: float = 0.05
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 600.0
    default_block_size: int = 16
    # "prefix" (the pipeline) or "round_robin" (a baseline for benchmarks).
    policy: str = "prefix"
    k8s_namespace: str | None = None
    k8s_prefill_selector: str | None = None
    k8s_decode_selector: str | None = None
    k8s_worker_selector: str | None = None
    k8s_port: int = 8000

    def __post_init__(self) -> None:
        self.prefill_urls = tuple(normalize_url(u) for u in self.prefill_urls)
        self.decode_urls = tuple(normalize_url(u) for u in self.decode_urls)
        self.worker_urls = tuple(normalize_url(u) for u in self.worker_urls)
        for specs in (self.vllm_prefill_urls, self.vllm_decode_urls, self.vllm_worker_urls):
            for spec in specs:
                parse_vllm_worker(spec)  # raises ValueError naming the bad spec
        if not 0 < self.vllm_kv_events_port < 65536:
            raise ValueError(f"vllm_kv_events_port must be a TCP port, got {self.vllm_kv_events_port}")
        for weights in (self.prefill_weights, self.decode_weights):
            unknown = set(weights) - set(SCORER_NAMES)
            if unknown:
                raise ValueError(f"unknown scorers: {sorted(unknown)}")
        if self.disagg_threshold < 0:
            raise ValueError("disagg_threshold must be >= 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.tenants_file and self.api_keys:
            raise ValueError("api_keys and tenants_file exclude each other: give every key a tenant in the file")
        if self.max_queue_per_worker is not None and self.max_queue_per_worker < 1:
            raise ValueError("max_queue_per_worker must be >= 1")
        if self.max_migrations < 0:
            raise ValueError("max_migrations must be >= 0")
        if self.stream_stall_timeout_s <= 0:
            raise ValueError("stream_stall_timeout_s must be > 0")
        if self.kv_event_ttl_s <= 0:
            raise ValueError("kv_event_ttl_s must be > 0")
        if self.policy not in ("prefix", "round_robin"):
            raise ValueError(f"unknown policy {self.policy!r}")

    @property
    def has_static_workers(self) -> bool:
        return any((self.prefill_urls, self.decode_urls, self.worker_urls, self.vllm_prefill_urls,
                    self.vllm_decode_urls, self.vllm_worker_urls))

    @property
    def uses_k8s(self) -> bool:
        return any((self.k8s_prefill_selector, self.k8s_decode_selector, self.k8s_worker_selector))


def normalize_url(url: str) -> str:
    """Worker identity: scheme://host:port without a trailing slash."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


def parse_vllm_worker(spec: str) -> tuple[str, str | None, str | None]:
    """``URL[,kv-events=tcp://HOST:PORT][,replay=tcp://HOST:PORT]`` -> (normalized URL, KV-events endpoint or
    None, vLLM's replay endpoint or None)."""
    url, *options = spec.split(",")
    found: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        key, value = key.strip(), value.strip()
        if key not in ("kv-events", "replay") or not eq or not value.startswith("tcp://") or key in found:
            raise ValueError(f"bad vLLM worker {spec!r}: expected URL[,kv-events=tcp://HOST:PORT]"
                             "[,replay=tcp://HOST:PORT]")
        found[key] = value
    if not url.strip():
        raise ValueError(f"bad vLLM worker {spec!r}: empty URL")
    return normalize_url(url), found.get("kv-events"), found.get("replay")
