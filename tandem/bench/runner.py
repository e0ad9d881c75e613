"""Running a benchmark: Poisson arrivals and/or a concurrency cap, every request streamed.

``run_benchmark(config) -> BenchResult`` is the library entry point (``benchmarks/*.py`` scripts use
it); ``run_sweep`` repeats it over several request rates or concurrencies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from tandem.bench.client import RequestRecord, endpoint_url, send_request
from tandem.bench.config import BenchConfig, BenchError
from tandem.bench.datasets import sample_requests
from tandem.bench.metrics import BenchSummary, summarize

# Seconds allowed to open a connection; the per-request read timeout is the config's.
CONNECT_TIMEOUT_S = 30.0


@dataclass(slots=True)
class BenchResult:
    """One run: what was asked, what every request did, and the summary."""

    config: BenchConfig
    url: str
    started_at: str
    records: list[RequestRecord]
    summary: BenchSummary
    warnings: list[str] = field(default_factory=list)


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (seconds after the start) of a Poisson process at ``request_rate`` req/s.

    The first request goes at 0; with an infinite rate all go at 0.
    """
    if math.isinf(request_rate):
        return [0.0] * num_requests
    # A separate stream from the dataset's, so changing the rate does not change the prompts.
    rng = random.Random(f"arrivals-{seed}")
    offsets = [0.0]
    for _ in range(num_requests - 1):
        offsets.append(offsets[-1] + rng.expovariate(request_rate))
    return offsets


async def arun_benchmark(config: BenchConfig, progress: bool = False) -> BenchResult:
    """Async form of :func:`run_benchmark`."""
    samples, warnings = sample_requests(config)
    offsets = arrival_offsets(len(samples), config.request_rate, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    timeout = httpx.Timeout(config.timeout_s, connect=min(CONNECT_TIMEOUT_S, config.timeout_s))
    # No pool limit: the concurrency cap is the benchmark's, not httpx's default of 100.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with tqdm(total=len(samples), disable=not progress, unit="req", desc="bench") as bar:
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            bench_start = time.perf_counter()

            async def one(index: int) -> RequestRecord:
                # Wait for this request's arrival time, then (if capped) for a free slot.
                delay = offsets[index] - (time.perf_counter() - bench_start)
                if delay > 0:
                    await asyncio.sleep(delay)
                if limit is None:
                    record = await send_request(client, config, samples[index], index, bench_start)
                else:
                    async with limit:
                        record = await send_request(client, config, samples[index], index, bench_start)
                bar.update(1)
                return record

            records = await asyncio.gather(*(one(i) for i in range(len(samples))))
            duration_s = time.perf_counter() - bench_start
    without_usage = sum(r.success and not r.usage_reported for r in records)
    if without_usage:
        warnings.append(
            f"{without_usage} successful requests got no usage from the server: their token counts are "
            "estimates (dataset prompt length, one token per streamed chunk)"
        )
    return BenchResult(
        config=config,
        url=endpoint_url(config.base_url, config.endpoint),
        started_at=started_at,
        records=list(records),
        summary=summarize(list(records), duration_s, config.goodput),
        warnings=warnings,
    )


def run_benchmark(config: BenchConfig, progress: bool = False) -> BenchResult:
    """Run one benchmark to completion and return its result (blocking; starts its own event loop)."""
    return asyncio.run(arun_benchmark(config, progress=progress))


def run_sweep(
    config: BenchConfig,
    request_rates: Sequence[float] = (),
    concurrencies: Sequence[int] = (),
    progress: bool = False,
) -> list[BenchResult]:
    """Run ``config`` once per request rate or once per concurrency cap (exactly one list non-empty)."""
    if bool(request_rates) == bool(concurrencies):
        raise BenchError("a sweep needs either request rates or concurrencies (exactly one of them)")
    if request_rates:
        configs = [dataclasses.replace(config, request_rate=rate) for rate in request_rates]
    else:
        configs = [dataclasses.replace(config, max_concurrency=c) for c in concurrencies]
    return [run_benchmark(c, progress=progress) for c in configs]
