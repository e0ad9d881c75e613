"""The router's Prometheus metrics (``tandem:`` prefix), in a registry owned by one app instance."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.runtime import register_process_collectors


class RouterMetrics:
    """Every metric the router exports. One instance per app, so tests can build several routers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_process_collectors(self.registry)
        self.requests = Counter(
            "tandem:router_requests",
            "Requests the router finished, by pool and worker of the last hop and by outcome",
            ["pool", "worker", "outcome"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "tandem:router_routing_decision_seconds",
            "Time to tokenize, hash and pick the workers for one request",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )
        self.prefix_hit_ratio = Histogram(
            "tandem:router_prefix_hit_ratio",
            "Fraction of the prompt's full blocks the chosen worker holds (per the KV-event index)",
            ["pool"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=self.registry,
        )
        self.retries = Counter(
            "tandem:router_retries", "Requests re-sent to another worker after a failure", ["pool"], registry=self.registry
        )
        self.migrations = Counter(
            "tandem:router_migrations",
            "Streams resumed on another worker after their worker failed mid-stream, by reason "
            "(connection_error, eof, error_event, stall)",
            ["reason"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "tandem:router_worker_ejections",
            "Times a worker was ejected as an outlier (failed requests), by pool and worker",
            ["pool", "worker"],
            registry=self.registry,
        )
        self.tenant_requests = Counter(
            "tandem:tenant_requests", "Requests by tenant and outcome (admitted, rate_limited)", ["tenant", "outcome"],
            registry=self.registry)
        self.tenant_tokens = Counter(
            "tandem:tenant_tokens", "Tokens counted against each tenant's limit (prompt, then completion)", ["tenant"],
            registry=self.registry)
        self.ratelimit_shared = Gauge(
            "tandem:router_ratelimit_shared",
            "1 when tenant limits are counted in Redis across replicas, 0 when each replica counts on its own",
            registry=self.registry)
        self.decisions = Counter(
            "tandem:router_decisions",
            "How requests were served: disaggregated (prefill then decode), direct (decode alone, "
            "prefill would not pay), aggregated (an aggregated worker) or prefill_fallback (prefill failed)",
            ["decision"],
            registry=self.registry,
        )
        self.redis_connected = Gauge(
            "tandem:router_redis_index_connected",
            "1 when the Redis KV-event index is connected (prefix-aware routing), 0 when routing by load only",
            registry=self.registry,
        )
        self.index_blocks = Gauge(
            "tandem:router_index_blocks", "Distinct block hashes in the prefix index", registry=self.registry
        )
        self.healthy_workers = Gauge(
            "tandem:router_healthy_workers", "Workers passing health checks, by pool", ["pool"], registry=self.registry
        )
        self.inflight = Gauge("tandem:router_inflight_requests", "Requests in flight in the router", registry=self.registry)


WORKER_STATES = ("healthy", "unhealthy", "ejected", "trial")


class WorkerStateCollector(Collector):
    """``tandem:router_worker_state{pool, worker, state}``: 1 for each worker's current state, read at scrape time
    (workers come and go under discovery, so the samples are built from the datastore, never left stale)."""

    def __init__(self, workers: Callable[[], Iterable]) -> None:
        self._workers = workers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        states = GaugeMetricFamily("tandem:router_worker_state",
                                   "1 for the worker's current state: healthy, unhealthy (failing health checks), "
                                   "ejected (outlier) or trial (ejection over, awaiting a successful request)",
                                   labels=["pool", "worker", "state"])
        weights = GaugeMetricFamily("tandem:router_worker_weight",
                                    "Routing weight: below 1 for a worker whose TTFT is far above its peers'",
                                    labels=["pool", "worker"])
        for worker in self._workers():
            current = worker.state
            for state in WORKER_STATES:
                states.add_metric([worker.pool.value, worker.url, state], 1.0 if state == current else 0.0)
            weights.add_metric([worker.pool.value, worker.url], worker.weight)
        yield states
        yield weights
