"""Presenting results: the end-of-run table, and JSON with the summary and every request."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from tandem.bench.client import RequestRecord
from tandem.bench.config import BenchConfig, BenchError
from tandem.bench.runner import BenchResult

WIDTH = 60


def _json_number(value: float | None) -> float | str | None:
    """JSON has no infinity: an infinite request rate is written as the string ``"inf"``."""
    if value is not None and math.isinf(value):
        return "inf"
    return value


def config_to_dict(config: BenchConfig) -> dict:
    """The run's settings; the API key is not written out."""
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    data["api_key"] = "***" if config.api_key else None
    data["request_rate"] = _json_number(config.request_rate)
    return data


def record_to_dict(record: RequestRecord) -> dict:
    """One request as JSON, times in seconds, plus its TPOT."""
    data = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    data["tpot_s"] = record.tpot_s
    return data


def result_to_dict(result: BenchResult) -> dict:
    """Everything about a run: settings, summary (latencies in ms), warnings and every request."""
    return {
        "url": result.url,
        "started_at": result.started_at,
        "config": config_to_dict(result.config),
        "summary": dataclasses.asdict(result.summary),
        "warnings": list(result.warnings),
        "requests": [record_to_dict(r) for r in result.records],
    }


def write_json(data: dict, path: str) -> None:
    """Write ``data`` to ``path`` as indented JSON, raising :class:`BenchError` when it cannot."""
    try:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as exc:
        raise BenchError(f"cannot write result file {path}: {exc}") from None


def _traffic(config: BenchConfig) -> str:
    rate = "inf" if math.isinf(config.request_rate) else f"{config.request_rate:g}"
    cap = config.max_concurrency if config.max_concurrency else "none"
    return f"rate {rate} req/s, max concurrency {cap}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(result: BenchResult) -> str:
    """The end-of-run table (plain text)."""
    s = result.summary
    c = result.config

    def row(label: str, value: object) -> str:
        return f"{label:<42}{value:>{WIDTH - 42}}"

    lines = [
        " Serving Benchmark Result ".center(WIDTH, "="),
        row("Endpoint:", result.url),
        row("Model:", c.model),
        row("Dataset:", f"{c.dataset}, {c.num_prompts} prompts"),
        row("Traffic:", _traffic(c)),
        row("Successful requests:", s.completed),
        row("Failed requests:", s.errors),
        row("Benchmark duration (s):", f"{s.duration_s:.2f}"),
        row("Total input tokens:", s.total_prompt_tokens),
        row("Total generated tokens:", s.total_output_tokens),
        row("Request throughput (req/s):", f"{s.request_throughput:.2f}"),
        row("Output token throughput (tok/s):", f"{s.output_throughput:.2f}"),
        row("Total token throughput (tok/s):", f"{s.total_token_throughput:.2f}"),
    ]
    if s.goodput is not None:
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in s.goodput_slo_ms.items())
        lines.append(row(f"Goodput (req/s) [{slo}]:", f"{s.goodput:.2f}"))
        lines.append(row("Requests meeting the SLO:", f"{s.good_requests}/{s.num_requests}"))
    if s.requests_without_usage:
        lines.append(row("Requests without server usage:", s.requests_without_usage))
    lines.append("-" * WIDTH)
    lines.append(f"{'Latency (ms)':<16}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}")
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2el)):
        lines.append(
            f"{name:<16}{_ms(stats.mean_ms):>11}{_ms(stats.p50_ms):>11}{_ms(stats.p90_ms):>11}{_ms(stats.p99_ms):>11}"
        )
    lines.append("=" * WIDTH)
    errors = [r.error for r in result.records if r.error]
    if errors:
        lines.append(f"First error: {errors[0]}")
    lines.extend(f"Warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def format_sweep_table(results: list[BenchResult]) -> str:
    """One row per run of a sweep."""
    header = (
        f"{'rate':>6}{'conc':>6}{'ok':>6}{'err':>5}{'req/s':>8}{'out tok/s':>11}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'E2E p50':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        s, c = r.summary, r.config
        rate = "inf" if math.isinf(c.request_rate) else f"{c.request_rate:g}"
        conc = str(c.max_concurrency) if c.max_concurrency else "-"
        lines.append(
            f"{rate:>6}{conc:>6}{s.completed:>6}{s.errors:>5}{s.request_throughput:>8.2f}{s.output_throughput:>11.1f}"
            f"{_ms(s.ttft.p50_ms):>10}{_ms(s.ttft.p99_ms):>10}{_ms(s.tpot.p50_ms):>10}{_ms(s.e2el.p50_ms):>10}"
        )
    return "\n".join(lines)
