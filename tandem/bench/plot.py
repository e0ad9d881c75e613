"""PNG plots (matplotlib's Agg canvas, no pyplot, so no GUI and no global figure state).

``plot_result``: latency distributions (TTFT, ITL, E2E) and throughput over time for one run.
``plot_sweep``: throughput vs latency for the runs of a sweep.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tandem.bench.config import BenchError
from tandem.bench.runner import BenchResult

# Most time buckets on the throughput-over-time panel, and the narrowest bucket in seconds.
TIME_BUCKETS = 40
MIN_BUCKET_S = 0.25


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise BenchError(f"cannot write plot {path}: {exc}") from None


def _histogram(ax, values_ms: list[float], title: str, color: str) -> None:
    """A histogram with p50/p99 marked; an empty panel says there was nothing to plot."""
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    if not values_ms:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values_ms, bins=min(40, max(5, len(values_ms) // 2)), color=color, alpha=0.8)
    p50, p99 = np.percentile(values_ms, (50, 99))
    ax.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.1f}")
    ax.axvline(p99, color="red", linestyle=":", label=f"p99 {p99:.1f}")
    ax.legend(fontsize=8)


def plot_result(result: BenchResult, path: str) -> None:
    """Write a 2x2 PNG: TTFT, ITL and E2E distributions, and throughput/in-flight over time.

    Output tokens over time spread each request's token count (server usage) evenly over its
    content chunks, since a chunk may carry more than one token.
    """
    ok = [r for r in result.records if r.success]
    s = result.summary
    fig = Figure(figsize=(12, 8))
    (ax_ttft, ax_itl), (ax_e2e, ax_time) = fig.subplots(2, 2)
    _histogram(ax_ttft, [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], "Time to first token", "tab:blue")
    _histogram(ax_itl, [g * 1e3 for r in ok for g in r.itl_s], "Inter-token latency", "tab:orange")
    _histogram(ax_e2e, [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None], "End-to-end latency", "tab:green")

    duration = max(s.duration_s, 1e-3)
    # Buckets of at least MIN_BUCKET_S: narrower ones show chunk arrival noise, not throughput.
    num_buckets = max(1, min(TIME_BUCKETS, int(duration / MIN_BUCKET_S)))
    edges = np.linspace(0.0, duration, num_buckets + 1)
    width = edges[1] - edges[0]
    times, weights = [], []
    for r in ok:
        chunk_times = r.chunk_times_s()
        if chunk_times:
            times.extend(chunk_times)
            weights.extend([r.output_tokens / len(chunk_times)] * len(chunk_times))
    tokens = np.histogram(times, bins=edges, weights=weights)[0] if times else np.zeros(num_buckets)
    ax_time.set_title("Throughput over time")
    ax_time.set_xlabel("seconds since start")
    ax_time.set_ylabel("output tokens/s")
    ax_time.step(edges, np.append(tokens / width, tokens[-1] / width), where="post", color="tab:purple",
                 label="output tok/s")
    ax_time.set_ylim(bottom=0)
    # Requests in flight (started, not finished; errors included since they held a slot), sampled finely.
    grid = np.linspace(0.0, duration, 200)
    starts = np.array([r.start_s for r in result.records if r.e2e_s is not None])  # [R]
    ends = starts + np.array([r.e2e_s for r in result.records if r.e2e_s is not None])  # [R]
    in_flight = ((starts[:, None] <= grid) & (grid < ends[:, None])).sum(axis=0)  # [200]
    ax_flight = ax_time.twinx()
    ax_flight.plot(grid, in_flight, color="tab:gray", alpha=0.7)
    ax_flight.set_ylabel("requests in flight")
    ax_flight.set_ylim(bottom=0, top=max(int(in_flight.max(initial=0)), 1) * 1.15)
    ax_time.plot([], [], color="tab:gray", label="requests in flight")  # legend entry for the twin axis
    ax_time.legend(fontsize=8, loc="lower right")

    c = result.config
    rate = "inf" if math.isinf(c.request_rate) else f"{c.request_rate:g}"
    fig.suptitle(
        f"{c.model} @ {result.url}\n{c.dataset}, {s.num_requests} requests, rate {rate}, "
        f"concurrency {c.max_concurrency or 'unlimited'}: {s.completed} ok, {s.errors} errors, "
        f"{s.output_throughput:.1f} out tok/s"
    )
    fig.tight_layout()
    _save(fig, path)


def plot_sweep(results: list[BenchResult], path: str) -> None:
    """Write one PNG of output throughput vs latency (TTFT, TPOT, E2E; p50 and p99) over a sweep."""
    fig = Figure(figsize=(15, 4.8))
    axes = fig.subplots(1, 3)
    throughput = [r.summary.output_throughput for r in results]
    # Label points by whichever setting the sweep varied.
    by_rate = len({r.config.request_rate for r in results}) > 1
    labels = [f"r={r.config.request_rate:g}" if by_rate else f"c={r.config.max_concurrency}" for r in results]
    for ax, (name, attr) in zip(axes, (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E latency", "e2el")), strict=True):
        p50 = [getattr(r.summary, attr).p50_ms for r in results]
        p99 = [getattr(r.summary, attr).p99_ms for r in results]
        ax.plot(throughput, [math.nan if v is None else v for v in p50], "o-", label="p50")
        ax.plot(throughput, [math.nan if v is None else v for v in p99], "s--", label="p99")
        for x, y, label in zip(throughput, p50, labels, strict=True):
            if y is not None:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{name} vs throughput")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = results[0].config
    fig.suptitle(f"{c.model} @ {results[0].url}: {c.dataset}, {c.num_prompts} requests per point")
    fig.tight_layout()
    _save(fig, path)
