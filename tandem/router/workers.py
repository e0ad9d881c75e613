"""The datastore of workers (static list or Kubernetes pods) and the active health checker that feeds it.

NOTE: watchers (health checker, discovery) only write the datastore; the picking path only reads it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)


class Pool(enum.StrEnum):
    """A worker's role. Aggregated workers serve whole requests; prefill/decode workers split them."""

    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"


# Engines the router drives: Tandem's own workers and vLLM's OpenAI server.
WORKER_KINDS = ("tandem", "vllm")


@dataclass(slots=True)
class Worker:
    """One engine worker as the router sees it. ``url`` is the worker's advertised identity."""

    url: str
    pool: Pool
    # The engine behind it: "tandem" or "vllm" (vLLM's OpenAI server: KV events over ZMQ, NixlConnector P/D).
    kind: str = "tandem"
    # vLLM only: its KV-event publisher when not the worker's host on --vllm-kv-events-port (tandem up).
    kv_events_endpoint: str | None = None
    # vLLM only: its replay socket (ROUTER), from which missed KV-event batches can be fetched again.
    kv_events_replay: str | None = None
    healthy: bool = False
    # Served model names from /v1/models; None until the first successful probe.
    models: frozenset[str] | None = None
    num_waiting: float = 0.0
    num_running: float = 0.0
    kv_usage: float = 0.0
    # Requests the router itself has at this worker right now (fresher than scraped metrics).
    inflight: int = 0
    consecutive_failures: int = 0
    # Outlier ejection (Envoy's): out of rotation until ``ejected_until``; then one trial request readmits it.
    ejected_until: float | None = None
    ejections: int = 0  # consecutive ejections: the next one lasts base x (ejections + 1), capped
    readmitted_at: float | None = None
    trial_inflight: bool = False
    # Time to first byte, smoothed (seconds); a worker far slower than its peers is down-weighted, not ejected.
    ttft_ewma_s: float | None = None
    ttft_samples: int = 0
    weight: float = 1.0

    def admits(self, now: float) -> bool:
        """Whether the picking path may send this worker a request now."""
        if not self.healthy:
            return False
        if self.ejected_until is None:
            return True
        return now >= self.ejected_until and not self.trial_inflight

    @property
    def state(self) -> str:
        """healthy | unhealthy (failing health checks) | ejected | trial (ejection over, awaiting a success)."""
        if self.ejected_until is not None:
            return "ejected" if time.monotonic() < self.ejected_until else "trial"
        return "healthy" if self.healthy else "unhealthy"


@dataclass(slots=True)
class OutlierPolicy:
    """When a failing worker is ejected and for how long (Envoy's outlier detection, simplified).

    Connection errors, timeouts and deaths mid-stream eject at once; 5xx answers after ``consecutive_5xx`` in a
    row. The n-th consecutive ejection lasts ``base_s * n`` capped at ``max_s``; the count resets once a
    readmitted worker has gone ``max_s`` without being ejected again.
    """

    base_s: float = 5.0
    max_s: float = 120.0
    consecutive_5xx: int = 3
    ttft_ratio: float = 3.0  # TTFT this many times the peers' median -> down-weighted
    # ... and at least this much slower in seconds: at millisecond TTFTs, a ratio is noise (prompt lengths vary).
    ttft_min_gap_s: float = 0.2
    # ... and judged only once it and its peers have answered this many streams: a cold start or one slow
    # request on a busy host must not send a tenant away from the worker holding its prefix.
    ttft_min_samples: int = 5
    min_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError("outlier ejection: need 0 < base_s <= max_s")
        if self.consecutive_5xx < 1:
            raise ValueError("outlier ejection: consecutive_5xx must be >= 1")


@dataclass(slots=True)
class Datastore:
    """All known workers by URL. Discovery adds/removes them; the health checker updates their state."""

    workers: dict[str, Worker] = field(default_factory=dict)
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    # Called with the worker on every ejection (the router counts them in its metrics).
    on_eject: Callable[[Worker], None] | None = None

    def add(self, url: str, pool: Pool, kind: str = "tandem", kv_events_endpoint: str | None = None) -> Worker:
        if kind not in WORKER_KINDS:
            raise ValueError(f"unknown worker kind {kind!r}: expected one of {', '.join(WORKER_KINDS)}")
        worker = self.workers.get(url)
        if worker is None or worker.pool != pool or worker.kind != kind:
            worker = Worker(url=url, pool=pool, kind=kind, kv_events_endpoint=kv_events_endpoint)
            self.workers[url] = worker
        return worker

    def remove(self, url: str) -> None:
        self.workers.pop(url, None)

    def pool(self, pool: Pool) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool == pool]

    def mark_failed(self, worker: Worker, reason: str) -> None:
        """Passive health check: a request to ``worker`` failed at the transport level or mid-stream (ejected
        at once), or with a 502/503/504 (unhealthy until its next health check; ejected after
        ``consecutive_5xx`` in a row)."""
        worker.consecutive_failures += 1
        if worker.healthy:
            logger.warning("worker %s marked unhealthy after a failed request: %s", worker.url, reason)
        worker.healthy = False
        if (not reason.startswith("status ") or worker.ejected_until is not None
                or worker.consecutive_failures >= self.outlier.consecutive_5xx):
            self.eject(worker, reason)

    def record_status(self, worker: Worker, status: int, reason: str) -> None:
        """Any other 5xx answer: counted towards ejection, without failing the worker's health."""
        worker.consecutive_failures += 1
        if worker.ejected_until is not None or worker.consecutive_failures >= self.outlier.consecutive_5xx:
            # NOTE: a failed trial ejects again at once, for longer.
            self.eject(worker, f"{reason} ({worker.consecutive_failures} in a row)")

    def eject(self, worker: Worker, reason: str) -> None:
        """Take ``worker`` out of rotation for a growing interval (a failed trial ejects it again, longer)."""
        now = time.monotonic()
        policy = self.outlier
        worker.trial_inflight = False
        if worker.ejected_until is not None and now < worker.ejected_until:
            return  # already out: one incident (e.g. several streams dying at once) is one ejection
        if worker.readmitted_at is not None and now - worker.readmitted_at > policy.max_s:
            worker.ejections = 0
        worker.ejections += 1
        duration = min(policy.base_s * worker.ejections, policy.max_s)
        worker.ejected_until = now + duration
        logger.warning("worker %s ejected for %.1f s (ejection %d): %s", worker.url, duration, worker.ejections, reason)
        if self.on_eject is not None:
            self.on_eject(worker)

    def begin_request(self, worker: Worker) -> None:
        """A request is being sent: to a worker past its ejection, it is the one trial request."""
        if worker.ejected_until is not None:
            worker.trial_inflight = True

    def record_success(self, worker: Worker, ttft_s: float | None = None) -> None:
        """The worker answered (first byte of a stream, or a whole response): readmit it after a trial."""
        worker.consecutive_failures = 0
        if worker.ejected_until is not None:
            logger.info("worker %s readmitted after a successful trial request", worker.url)
            worker.ejected_until = None
            worker.trial_inflight = False
            worker.readmitted_at = time.monotonic()
        if ttft_s is not None:
            worker.ttft_ewma_s = ttft_s if worker.ttft_ewma_s is None else 0.8 * worker.ttft_ewma_s + 0.2 * ttft_s
            worker.ttft_samples += 1
            self._reweigh(worker.pool)

    def _reweigh(self, pool: Pool) -> None:
        """Down-weight workers whose smoothed TTFT is far above the median of their pool's other workers."""
        workers = [w for w in self.pool(pool) if w.ttft_samples >= self.outlier.ttft_min_samples]
        if len(workers) < 2:
            return
        for w in workers:
            # The median of its peers (itself excluded: with two workers, a median including it would be
            # the mean, which a slow worker can never be three times above).
            median = statistics.median(o.ttft_ewma_s for o in workers if o is not w)
            slow = (median > 0 and w.ttft_ewma_s > self.outlier.ttft_ratio * median
                    and w.ttft_ewma_s - median > self.outlier.ttft_min_gap_s)
            weight = max(self.outlier.min_weight, median / w.ttft_ewma_s) if slow else 1.0
            if (weight < 1.0) != (w.weight < 1.0):
                logger.warning("worker %s %s: TTFT %.3f s vs the pool's median %.3f s", w.url,
                               "down-weighted" if weight < 1.0 else "back to full weight", w.ttft_ewma_s, median)
            w.weight = weight


# Engine gauges the scorers read, by their vLLM names.
_GAUGES = {
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:num_requests_running": "num_running",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def parse_engine_metrics(text: str) -> dict[str, float]:
    """Sum the scorer-relevant gauges out of a Prometheus text exposition (one model per worker)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        attr = _GAUGES.get(line[:name_end])
        if attr is None:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        values[attr] = values.get(attr, 0.0) + value
    return values


class HealthChecker:
    """Active health checks: every ``interval_s``, probe each worker's /health, then scrape /metrics.

    A worker is healthy when /health answers 200; its models come from /v1/models once it is healthy.
    """

    def __init__(self, datastore: Datastore, client: httpx.AsyncClient, interval_s: float, timeout_s: float) -> None:
        self._datastore = datastore
        self._client = client
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self.checked = asyncio.Event()  # set after the first full round (tests and `tandem up` wait on it)

    async def run(self) -> None:
        while True:
            await self.check_all()
            self.checked.set()
            await asyncio.sleep(self._interval_s)

    async def check_all(self) -> None:
        workers = list(self._datastore.workers.values())
        await asyncio.gather(*(self.check(w) for w in workers))

    async def check(self, worker: Worker) -> None:
        try:
            response = await self._client.get(worker.url + "/health", timeout=self._timeout_s)
            healthy = response.status_code == 200
            if healthy:
                if worker.models is None:
                    models = await self._client.get(worker.url + "/v1/models", timeout=self._timeout_s)
                    models.raise_for_status()
                    worker.models = frozenset(m["id"] for m in models.json().get("data", []))
                metrics = await self._client.get(worker.url + "/metrics", timeout=self._timeout_s)
                if metrics.status_code == 200:
                    for attr, value in parse_engine_metrics(metrics.text).items():
                        setattr(worker, attr, value)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            healthy = False
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = f"/health answered {response.status_code}"
        if healthy and not worker.healthy:
            # NOTE: consecutive failures are reset by a successful request only: a worker that passes its health
            # checks but fails every request must still reach the ejection threshold.
            logger.info("worker %s (%s) is healthy", worker.url, worker.pool)
        elif not healthy and worker.healthy:
            logger.warning("worker %s (%s) failed its health check: %s", worker.url, worker.pool, reason)
        worker.healthy = healthy
