"""Serving latency of `tandem serve` at several concurrencies: TTFT and ITL p50/p99, throughput.

Starts a `tandem serve` (or uses --base-url), then runs the `tandem bench` library at concurrency 1, 8
and 32 on the same random prompts. Prints a table and writes JSON.

    python benchmarks/serve_latency.py [--base-url URL] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tandem.ports import free_port


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tandem serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        print("waiting for tandem serve to load...", file=sys.stderr, flush=True)
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("tandem serve did not become healthy")


def main() -> int:
    from tandem.bench import BenchConfig, run_benchmark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompts-per-level", type=int, default=None, help="default: 4 x concurrency, at least 8")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default="results/serve_latency.json")
    args = ap.parse_args()

    proc = None
    url = args.base_url
    if url is None:
        proc, url = start_server(["--model", args.model, "--max-model-len", "2048"])
    try:
        rows = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = args.prompts_per_level or max(8, 4 * c)
            cfg = BenchConfig(base_url=url, model=args.model, dataset="random", num_prompts=n, max_concurrency=c,
                              input_len=args.input_len, output_len=args.output_len, ignore_eos=True, seed=c)
            print(f"concurrency {c}: {n} requests", file=sys.stderr, flush=True)
            s = run_benchmark(cfg).summary
            rows.append({"concurrency": c, "requests": n, "errors": s.errors,
                         "ttft_p50_ms": s.ttft.p50_ms, "ttft_p99_ms": s.ttft.p99_ms,
                         "itl_p50_ms": s.itl.p50_ms, "itl_p99_ms": s.itl.p99_ms,
                         "output_tok_s": s.output_throughput, "req_s": s.request_throughput})
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    base = rows[0]["output_tok_s"]
    print(f"\n{'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'out tok/s':>10} "
          f"{'vs c=' + str(rows[0]['concurrency']):>7} {'errors':>6}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['ttft_p50_ms']:>8.0f}ms {r['ttft_p99_ms']:>8.0f}ms {r['itl_p50_ms']:>7.0f}ms "
              f"{r['itl_p99_ms']:>7.0f}ms {r['output_tok_s']:>10.1f} {r['output_tok_s'] / base:>6.2f}x "
              f"{r['errors']:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"url": url, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
