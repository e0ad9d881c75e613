"""``tandem bench``: a serving benchmark for any OpenAI-compatible endpoint.

Library use (what ``benchmarks/*.py`` scripts do)::

    from tandem.bench import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(base_url="http://127.0.0.1:8000", model="m", num_prompts=32))
    print(result.summary.output_throughput, result.summary.ttft.p99_ms)

Imports no torch; matplotlib loads only in :mod:`tandem.bench.plot`.
"""

from __future__ import annotations

from tandem.bench.client import RequestRecord
from tandem.bench.config import BenchConfig, BenchError, parse_goodput
from tandem.bench.datasets import SampledRequest, sample_requests
from tandem.bench.metrics import BenchSummary, LatencyStats, summarize
from tandem.bench.report import format_table, result_to_dict, write_json
from tandem.bench.runner import BenchResult, arun_benchmark, run_benchmark, run_sweep

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "BenchSummary",
    "LatencyStats",
    "RequestRecord",
    "SampledRequest",
    "arun_benchmark",
    "format_table",
    "parse_goodput",
    "result_to_dict",
    "run_benchmark",
    "run_sweep",
    "sample_requests",
    "summarize",
    "write_json",
]
