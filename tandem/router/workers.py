"""The datastore of workers (static list or Kubernetes pods) and the active health checker that feeds it.

NOTE: watchers (health checker, discovery) only write the datastore; the picking path only reads it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)


class Pool(enum.StrEnum):
    """A worker's role. Aggregated workers serve whole requests; prefill/decode workers split them."""

    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"


@dataclass(slots=True)
class Worker:
    """One engine worker as the router sees it. ``url`` is the worker's advertised identity."""

    url: str
    pool: Pool
    healthy: bool = False
    # Served model names from /v1/models; None until the first successful probe.
    models: frozenset[str] | None = None
    num_waiting: float = 0.0
    num_running: float = 0.0
    kv_usage: float = 0.0
    # Requests the router itself has at this worker right now (fresher than scraped metrics).
    inflight: int = 0
    consecutive_failures: int = 0


@dataclass(slots=True)
class Datastore:
    """All known workers by URL. Discovery adds/removes them; the health checker updates their state."""

    workers: dict[str, Worker] = field(default_factory=dict)

    def add(self, url: str, pool: Pool) -> Worker:
        worker = self.workers.get(url)
        if worker is None or worker.pool != pool:
            worker = Worker(url=url, pool=pool)
            self.workers[url] = worker
        return worker

    def remove(self, url: str) -> None:
        self.workers.pop(url, None)

    def pool(self, pool: Pool) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool == pool]

    def mark_failed(self, worker: Worker, reason: str) -> None:
        """Passive health check: a request to ``worker`` failed at the transport level or with a 5xx."""
        worker.consecutive_failures += 1
        if worker.healthy:
            logger.warning("worker %s marked unhealthy after a failed request: %s", worker.url, reason)
        worker.healthy = False


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
            logger.info("worker %s (%s) is healthy", worker.url, worker.pool)
            worker.consecutive_failures = 0
        elif not healthy and worker.healthy:
            logger.warning("worker %s (%s) failed its health check: %s", worker.url, worker.pool, reason)
        worker.healthy = healthy
