"""``tandem bench serve`` (one run) and ``tandem bench sweep`` (several rates or concurrencies)."""

from __future__ import annotations

import argparse
import math
import sys

from tandem.bench.config import DATASETS, ENDPOINTS, BenchConfig, BenchError, parse_goodput


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``serve`` and ``sweep``."""
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    target.add_argument("--model", required=True, help="model name sent in every request")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--endpoint", choices=ENDPOINTS, default="completions",
                        help="/v1/completions or /v1/chat/completions (default: completions)")
    target.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for --dataset sharegpt)")
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument("--input-len", type=int, default=128,
                      help="prompt tokens (random) or question tokens (shared-prefix)")
    data.add_argument("--output-len", type=int, default=None,
                      help="max_tokens per request (default 128; ShareGPT: the recorded reply's length)")
    data.add_argument("--range-ratio", type=float, default=0.0,
                      help="draw lengths uniformly from [len*(1-r), len*(1+r)] (default 0: fixed)")
    data.add_argument("--prefix-len", type=int, default=512, help="shared system-prompt tokens per tenant")
    data.add_argument("--num-prefixes", type=int, default=4, help="tenants (distinct shared prefixes)")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer.json (or its folder) for exact token lengths; default: one word ~ one token")
    data.add_argument("--seed", type=int, default=0)

    req = p.add_argument_group("requests")
    req.add_argument("--temperature", type=float, default=0.0)
    req.add_argument("--ignore-eos", action="store_true",
                     help="send ignore_eos=true (vLLM extension) so every request generates --output-len tokens")
    req.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                     help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 (keys: ttft, tpot, e2el)")
    req.add_argument("--disable-tqdm", action="store_true", help="no progress bar")

    out = p.add_argument_group("output")
    out.add_argument("--result-file", default=None, help="write JSON (summary and every request) here")
    out.add_argument("--plot", default=None, help="write a PNG here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``serve`` and ``sweep`` to the ``tandem bench`` parser."""
    sub = parser.add_subparsers(dest="bench_command", metavar="{serve,sweep}", required=True)
    serve = sub.add_parser("serve", help="benchmark one endpoint at one load",
                           description="Benchmark an OpenAI-compatible endpoint at one load.")
    _add_common(serve)
    load = serve.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second, Poisson arrivals (default inf: all at once)")
    load.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")

    sweep = sub.add_parser("sweep", help="benchmark several rates or concurrencies, plot throughput vs latency",
                           description="Run the benchmark once per request rate or per concurrency.")
    _add_common(sweep)
    points = sweep.add_mutually_exclusive_group(required=True)
    points.add_argument("--request-rates", default=None, help="comma-separated rates, e.g. 1,2,4,inf")
    points.add_argument("--concurrencies", default=None, help="comma-separated caps, e.g. 1,2,4,8")
    sweep.add_argument("--request-rate", type=float, default=math.inf,
                       help="fixed rate while sweeping --concurrencies (default inf)")
    sweep.add_argument("--max-concurrency", type=int, default=None,
                       help="fixed cap while sweeping --request-rates (default none)")


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        seed=args.seed,
        tokenizer=args.tokenizer,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        goodput=parse_goodput(args.goodput),
    )


def _parse_list(text: str, kind: type, flag: str) -> list:
    """``"1,2,4"`` -> ``[1, 2, 4]`` of ``kind``; a clear error for anything else."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise BenchError(f"{flag} is empty")
    return values


def _serve(args: argparse.Namespace) -> int:
    from tandem.bench.plot import plot_result
    from tandem.bench.report import format_table, result_to_dict, write_json
    from tandem.bench.runner import run_benchmark

    result = run_benchmark(_config(args), progress=not args.disable_tqdm)
    print(format_table(result))
    if args.result_file:
        write_json(result_to_dict(result), args.result_file)
        print(f"Results written to {args.result_file}")
    if args.plot:
        plot_result(result, args.plot)
        print(f"Plot written to {args.plot}")
    # Non-zero when nothing succeeded, so scripts notice a dead or misconfigured endpoint.
    return 0 if result.summary.completed else 1


def _sweep(args: argparse.Namespace) -> int:
    from tandem.bench.plot import plot_sweep
    from tandem.bench.report import format_sweep_table, result_to_dict, write_json
    from tandem.bench.runner import run_sweep

    config = _config(args)
    rates = _parse_list(args.request_rates, float, "--request-rates") if args.request_rates else []
    concurrencies = _parse_list(args.concurrencies, int, "--concurrencies") if args.concurrencies else []
    results = run_sweep(config, request_rates=rates, concurrencies=concurrencies, progress=not args.disable_tqdm)
    print(format_sweep_table(results))
    if args.result_file:
        write_json({"runs": [result_to_dict(r) for r in results]}, args.result_file)
        print(f"Results written to {args.result_file}")
    if args.plot:
        plot_sweep(results, args.plot)
        print(f"Plot written to {args.plot}")
    return 0 if all(r.summary.completed for r in results) else 1


def run(args: argparse.Namespace) -> int:
    """Entry point for ``tandem bench``; bad input is reported in one line, exit code 2."""
    try:
        return _sweep(args) if args.bench_command == "sweep" else _serve(args)
    except BenchError as exc:
        print(f"tandem bench: error: {exc}", file=sys.stderr)
        return 2
