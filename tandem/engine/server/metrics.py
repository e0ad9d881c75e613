"""Prometheus metrics of one engine server, named like vLLM's so existing dashboards work.

NOTE: every server owns its registry (no process-global state); gauges that mirror the engine are
read from the engine's latest stats snapshot at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.engine.llm_engine import EngineStats
from tandem.runtime import register_process_collectors

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self):
        s = self.stats()
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running if s else 0)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting if s else 0)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                    s.kv_cache_usage if s else 0.0)
        yield gauge("tandem:kv_cache_blocks_total", "KV-cache blocks in the pool.", s.num_blocks if s else 0)
        yield gauge("tandem:kv_cache_blocks_free", "KV-cache blocks free (cached or empty).",
                    s.num_free_blocks if s else 0)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries if s else 0)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits if s else 0)
        yield counter("vllm:num_preemptions", "Requests preempted for lack of KV blocks.",
                      s.num_preemptions if s else 0)
        yield counter("vllm:spec_decode_num_drafts", "Speculative steps (draft runs verified).",
                      s.spec_num_drafts if s else 0)
        yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_num_draft_tokens if s else 0)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      s.spec_num_accepted_tokens if s else 0)


class ServerMetrics:
    """The engine server's metrics in its own registry."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None],
                 registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        # A worker role passes the registry its connector's metrics already live in.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(model_name, stats))
        register_process_collectors(self.registry)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.request_errors = Counter("tandem:request_errors", "Requests rejected or failed, by HTTP status.",
                                      labels + ["status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time waiting before first schedule.",
                                    labels, buckets=E2E_BUCKETS, registry=r)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds",
                                      "Time in the prefill phase: first schedule to first token.", labels,
                                      buckets=E2E_BUCKETS, registry=r)
        self.decode_time = Histogram("vllm:request_decode_time_seconds",
                                     "Time in the decode phase: first token to last.", labels,
                                     buckets=E2E_BUCKETS, registry=r)
        self.inference_time = Histogram("vllm:request_inference_time_seconds",
                                        "Time running: first schedule to last token.", labels,
                                        buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
                                            registry=r)
        self.generation_tokens_hist = Histogram("vllm:request_generation_tokens", "Generated tokens per request.",
                                                labels, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
                                                registry=r)
