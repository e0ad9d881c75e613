"""Turning request records into the benchmark's numbers: throughputs, latency percentiles, goodput."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(slots=True, frozen=True)
class LatencyStats:
    """Mean and percentiles of one latency metric in milliseconds; all None when there are no samples."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def from_seconds(cls, values_s: list[float]) -> LatencyStats:
        """Stats of ``values_s`` (seconds), reported in milliseconds."""
        if not values_s:
            return cls(count=0, mean_ms=None, p50_ms=None, p90_ms=None, p99_ms=None)
        values_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(values_ms, PERCENTILES))
        return cls(count=len(values_s), mean_ms=float(values_ms.mean()), p50_ms=p50, p90_ms=p90, p99_ms=p99)


@dataclass(slots=True, frozen=True)
class BenchSummary:
    """Aggregate results of one run. Token totals and latencies cover successful requests only.

    ``goodput`` is the rate (req/s) of successful requests meeting every SLO in ``goodput_slo_ms``;
    None when no SLO was given. ``requests_without_usage`` counts successful requests whose token
    counts are estimates because the server sent no ``usage``.
    """

    num_requests: int
    completed: int
    errors: int
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    requests_without_usage: int
    goodput_slo_ms: dict[str, float] = field(default_factory=dict)
    good_requests: int | None = None
    goodput: float | None = None


def meets_slo(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Whether a successful ``record`` meets every SLO (``ttft``, ``tpot``, ``e2el`` in ms).

    A request with one output token has no TPOT and passes that SLO (as in vLLM's benchmark).
    """
    if not record.success:
        return False
    measured_s = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2e_s}
    for key, limit_ms in slo_ms.items():
        value_s = measured_s[key]
        if value_s is None or value_s * 1000.0 > limit_ms:
            return False
    return True


def summarize(records: list[RequestRecord], duration_s: float, goodput_slo_ms: dict[str, float]) -> BenchSummary:
    """The summary of one run lasting ``duration_s`` seconds."""
    ok = [r for r in records if r.success]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    # NOTE: duration is > 0 for any real run; the guard only keeps a degenerate call finite.
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    good = sum(meets_slo(r, goodput_slo_ms) for r in ok) if goodput_slo_ms else None
    return BenchSummary(
        num_requests=len(records),
        completed=len(ok),
        errors=len(records) - len(ok),
        duration_s=duration_s,
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(prompt_tokens + output_tokens) * per_s,
        ttft=LatencyStats.from_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=LatencyStats.from_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl=LatencyStats.from_seconds([gap for r in ok for gap in r.itl_s]),
        e2el=LatencyStats.from_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        requests_without_usage=sum(not r.usage_reported for r in ok),
        goodput_slo_ms=dict(goodput_slo_ms),
        good_requests=good,
        goodput=None if good is None else good * per_s,
    )
