"""Disaggregated prefill/decode on one machine: KV transfer bandwidth and what disaggregation costs in TTFT.

    .venv/bin/python benchmarks/kv_transfer.py [--out results/kv_transfer.json] [--repeats 5] [--transfer-samples 15]

Three parts, one run, one JSON file:

1. ``raw``: raw NIXL DRAM->DRAM READ GB/s of one contiguous region of the same byte count as the KV of a
   256, 1,024 and 4,096-token prompt (SmolLM2-135M, bf16), between two processes, and the transport's block
   READ of those blocks (consecutive ids), via ``benchmarks/kv_transfer_raw.py``'s owner process; one READ of
   each right after every engine transfer of part 2, so both see the same machine load and the medians (and
   10th percentiles) compare samples of equal number from the same window. Two buffer kinds:
   ordinary torch allocations (4 KiB pages: what a plain NIXL user gets) and transparent huge pages (how the
   engine allocates its KV pool; UCX's ``cma`` pins and copies page by page, so these READs are faster).
   "hot" READs land in the same, recently written destination bytes every time; "DRAM" READs repeat them
   after sweeping 96 MB through the caches (at 256 tokens source and destination, 2 x 5.9 MB, fit in the
   32 MB L3, which flatters the hot READ; the engine's READ never finds its bytes there).
2. ``engine``: Tandem's own block transfer inside real workers: a ``tandem prefill`` and a ``tandem decode``
   (bf16, ``--threads 1`` each); every disaggregated request's READ is read off the decode worker's metrics
   (``tandem:kv_transfer_bytes_total`` / ``tandem:kv_transfer_duration_seconds_sum`` deltas);
   ``--transfer-samples`` disaggregated requests per prompt length (default 15: single READs on a shared VM
   vary by 2x either way, and five of them gave medians that moved 0.5-1.1x between runs).
3. ``ttft``: time to first token, streamed, seen by the client: aggregated (one ``tandem serve``) vs
   disaggregated (the client sends the prompt to the prefill worker, then the original request plus the
   returned ``kv_transfer_params`` to the decode worker, and the clock stops at the decode's first token).
   Every engine gets the same ``--threads`` (default 1: equal compute per engine, so the difference is the
   disaggregation overhead, not a core count). Each repeat uses a fresh random prompt (no prefix-cache hits);
   aggregated and disaggregated runs alternate so machine noise hits both alike. The prompt's compute (2-14 s)
   varies between requests by more than the overhead in question, so each pair is also compared with it taken
   out: TTFT minus the prefill time the computing engine measured (``vllm:request_prefill_time_seconds``); the
   goal is judged on the median of those paired differences. The second token is timed the same way: it waits
   for the KV transfer and the decode worker's first step (the first token is the prefill's, streamed at once).

A fifth raw baseline, "pool", READs into successive stretches of a huge-page destination as large as an engine's
KV pool (``KV_CACHE_MIB``), wrapping at its end, as an engine's LRU free queue walks its pool: it shows what the
age of the destination memory costs a READ on this machine, which the "hot"/"DRAM" READs (the same destination
bytes every time) never pay.

Both the raw and the engine READs are timed twice: by NIXL itself (post -> completion, its telemetry, as vLLM's
connector reports transfer time; the goal is judged on this) and on the reader's own clock ("wall": + creating
the NIXL request, + any wait for the GIL, which in a worker shares the process with the engine thread and the
HTTP server). The second table prints the wall view and the setup time per READ, so neither is hidden.

Goals: engine block transfer >= 0.8 x raw DRAM->DRAM GB/s (median over median, both buffer kinds); disaggregation
adds < 15 ms to TTFT at 1,024 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import kv_transfer_raw as raw_bench  # noqa: E402

from tandem.engine.host_memory import transparent_huge_pages_mode  # noqa: E402
from tandem.engine.model_runner import KV_POOL_FILL  # noqa: E402
from tandem.kvtransfer.handshake import KVCompatibility, RemotePeerCache  # noqa: E402
from tandem.kvtransfer.nixl_transport import NixlKVTransport  # noqa: E402
from tandem.ports import free_port  # noqa: E402

PROMPT_TOKENS = (256, 1024, 4096)
MODEL = raw_bench.MODEL


class Worker:
    """A ``tandem <role>`` process with its log in a temp file."""

    def __init__(self, role: str, args: list[str]) -> None:
        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"kvbench-{role}-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "tandem.cli", role, "--port", str(self.port), *args]
        if role != "serve":
            command += ["--kv-port", str(free_port())]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.role} not healthy after {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------------------- part 1
class RawReader:
    """The raw baseline: an owner process holding a SmolLM2-shaped bf16 KV cache (``kv_transfer_raw.py
    --owner``) and a reader transport in this process, both on ordinary torch allocations (4 KiB pages) or both
    on transparent huge pages as the engine allocates its pool (``huge_pages``). It stays up during the serving
    runs, so raw READs are taken interleaved with the engines' transfers and machine noise hits both alike."""

    def __init__(self, ucx_tls: str | None, huge_pages: bool, pool_bytes: int | None = None) -> None:
        self.layout = raw_bench.smol_layout(512)  # the owner's, and the part of ours that "hot"/"DRAM" READs use
        command = [sys.executable, str(ROOT / "benchmarks" / "kv_transfer_raw.py"), "--owner", "--num-blocks", "512"]
        if huge_pages:
            command.append("--huge-pages")
        if ucx_tls:
            command += ["--ucx-tls", ucx_tls]
        self.owner = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.transport: NixlKVTransport | None = None
        port = None
        for line in self.owner.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                port = json.loads(line)["port"]
                break
        if port is None:
            self.close()
            raise RuntimeError(f"raw owner exited with {self.owner.wait(10)}")
        self._scratch = torch.ones(DRAM_SWEEP_BYTES // 4, dtype=torch.int32)  # see sample_dram
        # Filled like the engine's pool. With ``pool_bytes``, a pool that large follows the "hot" part, for
        # ``sample_pool``.
        local = self.layout
        self._pool_start = self._next_block = local.num_blocks
        if pool_bytes is not None:
            local = raw_bench.smol_layout(local.num_blocks + pool_bytes // local.bytes_per_block_all_layers)
        self._pool_end = local.num_blocks
        buffer = raw_bench.local_buffer(local, KV_POOL_FILL, huge_pages)
        # A pure reader, like the decode worker: no progress thread (see nixl_transport's module note).
        self.transport = NixlKVTransport(buffer, local, f"kvbench-reader-{os.getpid()}-{int(huge_pages)}",
                                         ucx_tls, progress_thread=False)
        self.peer = RemotePeerCache(self.transport, KVCompatibility.from_layout(MODEL, self.layout)).get("127.0.0.1", port)
        raw_bench.read_blocks(self.transport, self.peer, [0], [0], 30.0)  # connect

    def sample(self, tokens: int) -> tuple[raw_bench.ReadTiming, float]:
        """(raw one-region READ, transport block READ seconds) for the KV of ``tokens`` tokens, both into the start
        of the destination buffer (hot: the same bytes every time)."""
        assert self.transport is not None
        n = tokens // self.layout.block_size
        num_bytes = n * self.layout.bytes_per_block_all_layers
        raw_s = raw_bench.read_region(self.transport, self.peer.agent_name, self.peer.base_address, num_bytes, 30.0)
        handle = raw_bench.read_blocks(self.transport, self.peer, list(range(n)), list(range(n)), 30.0)[1]
        return raw_s, handle.transfer_s or handle.duration_s or 0.0

    def sample_dram(self, tokens: int, first_block: int = 0) -> raw_bench.ReadTiming:
        """One raw one-region READ into the destination (from its start, or from ``first_block``), as ``sample``'s,
        but after sweeping a buffer three times the size of this CPU's last-level cache: source and destination
        come from DRAM, not from cache (at 256 tokens both fit in a 32 MB L3, which flatters the hot READ)."""
        assert self.transport is not None
        bpb = self.layout.bytes_per_block_all_layers
        self._scratch.add_(1)
        return raw_bench.read_region(self.transport, self.peer.agent_name, self.peer.base_address,
                                     tokens // self.layout.block_size * bpb, 30.0, local_offset=first_block * bpb)

    def sample_pool(self, tokens: int) -> raw_bench.ReadTiming:
        """``sample_dram``'s READ, but each one into the next stretch of a destination as large as an engine's KV
        pool, wrapping at its end: the destination is as old as an engine's free blocks are when a READ lands in
        them (an LRU free queue walks the whole pool), where ``sample_dram`` writes the same bytes every time."""
        assert self.transport is not None and self._pool_end > self._pool_start, "no pool: pass pool_bytes"
        n = tokens // self.layout.block_size
        if self._next_block + n > self._pool_end:
            self._next_block = self._pool_start
        first, self._next_block = self._next_block, self._next_block + n
        return self.sample_dram(tokens, first)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.owner.stdin:
            self.owner.stdin.close()
        try:
            self.owner.wait(20)
        except subprocess.TimeoutExpired:
            self.owner.kill()
            self.owner.wait(10)


# ---------------------------------------------------------------------------------------- parts 2, 3
def random_prompt(rng: random.Random, tokens: int) -> list[int]:
    # Ids of ordinary tokens (SmolLM2's vocabulary is 49,152); fresh per repeat, so nothing is cached.
    return [rng.randrange(1000, 40000) for _ in range(tokens)]


def request_body(rng: random.Random, tokens: int) -> dict:
    """A fresh greedy request for exactly two tokens (EOS ignored, so there always is a second)."""
    return {"prompt": random_prompt(rng, tokens), "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def ttft_case(tokens: int, agg: list[Timing], dis: list[Timing], round_trips: list[float]) -> dict:
    """TTFT of aggregated vs disaggregated serving for one prompt length, from alternating pairs of requests.

    The prompt's compute dominates both (2-14 s here) and varies by several percent between requests and
    processes, far more than the overhead in question. So besides the plain medians, each pair is compared with
    the prompt's compute taken out: TTFT minus the prefill time the computing engine itself measured
    (``vllm:request_prefill_time_seconds``: the serve engine's for aggregated, the prefill worker's for
    disaggregated). What remains is everything else: HTTP, queueing, and for disaggregation the prefill round
    trip's overhead and the decode hop. The same is done for the second token, which waits for the KV transfer
    and the decode worker's first step (the first token is the prefill's, streamed at once).
    """
    ms = 1e3
    added = [(d.first_s - d.prefill_s) - (a.first_s - a.prefill_s) for a, d in zip(agg, dis)]
    added_second = [(d.second_s - d.prefill_s) - (a.second_s - a.prefill_s) for a, d in zip(agg, dis)]
    return {
        "prompt_tokens": tokens,
        "aggregated_ttft_ms": statistics.median(a.first_s for a in agg) * ms,
        "disaggregated_ttft_ms": statistics.median(d.first_s for d in dis) * ms,
        "added_ms": (statistics.median(d.first_s for d in dis) - statistics.median(a.first_s for a in agg)) * ms,
        # The goal's figure: median over pairs of what disaggregation adds beyond the prompt's compute.
        "added_compute_removed_ms": statistics.median(added) * ms,
        "added_compute_removed_samples_ms": [x * ms for x in added],
        "aggregated_prefill_ms": statistics.median(a.prefill_s for a in agg) * ms,
        "disaggregated_prefill_ms": statistics.median(d.prefill_s for d in dis) * ms,
        "disaggregated_prefill_round_trip_ms": statistics.median(round_trips) * ms,
        # What the decode worker adds after the prompt is computed: disaggregated TTFT minus the prefill round trip.
        "decode_hop_ttft_ms": statistics.median(d.first_s - p for d, p in zip(dis, round_trips)) * ms,
        "aggregated_second_token_ms": statistics.median(a.second_s for a in agg) * ms,
        "disaggregated_second_token_ms": statistics.median(d.second_s for d in dis) * ms,
        "second_token_added_compute_removed_ms": statistics.median(added_second) * ms,
        "aggregated_samples_ms": [a.first_s * ms for a in agg],
        "disaggregated_samples_ms": [d.first_s * ms for d in dis],
    }


class Timing(NamedTuple):
    """A streamed request as the client saw it, and the serving engine's own prefill time for it."""

    first_s: float  # request sent -> first token
    second_s: float  # request sent -> second token (the bodies here ask for exactly two, ignoring EOS)
    prefill_s: float  # the engine that computed the prompt: first schedule -> first token
                      # (vllm:request_prefill_time_seconds), so the prompt's compute can be taken out of TTFT


def stream_times(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    """Seconds from sending the request to its first and to its second streamed token."""
    started = time.perf_counter()
    times: list[float] = []
    with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter() - started
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url}: {line}")
            # An event carries a token when it has text; the last (finish_reason set) always carries one.
            if any(c["text"] or c["finish_reason"] for c in event.get("choices", [])):
                times.append(now)
    if len(times) < 2:
        raise RuntimeError(f"{url}: {len(times)} token events streamed, expected 2")
    return times[0], times[1]


def prefill_seconds(client: httpx.Client, worker: Worker) -> float:
    """The worker's ``vllm:request_prefill_time_seconds_sum`` (0 before its first observation)."""
    return metric(client.get(f"{worker.url}/metrics").text, "vllm:request_prefill_time_seconds_sum")


def aggregated(client: httpx.Client, serve: Worker, body: dict) -> Timing:
    before = prefill_seconds(client, serve)
    first, second = stream_times(client, serve.url, body)
    return Timing(first, second, prefill_seconds(client, serve) - before)


def disaggregated(client: httpx.Client, prefill: Worker, decode: Worker, body: dict) -> tuple[Timing, float, dict]:
    """(times of one disaggregated request, its prefill round trip, its kv_transfer_params). Its clock runs from
    sending the prompt to the prefill worker; the decode request follows at once."""
    before = prefill_seconds(client, prefill)
    started = time.perf_counter()
    r = client.post(f"{prefill.url}/v1/completions",
                    json={**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}})
    if r.status_code != 200:
        raise RuntimeError(f"prefill: {r.status_code} {r.text[:300]}")
    params = r.json()["kv_transfer_params"]
    round_trip = time.perf_counter() - started
    first, second = stream_times(client, decode.url, {**body, "kv_transfer_params": params})
    computed = prefill_seconds(client, prefill) - before
    return Timing(round_trip + first, round_trip + second, computed), round_trip, params


KV_CACHE_MIB = 512  # every engine's --kv-cache-memory
DRAM_SWEEP_BYTES = 96 << 20  # 3x the L3 of the CPUs this was built on (AMD Zen 5, 32 MB per CCD)


BASELINES = {  # name -> (reader, which READ: RawReader.sample ("hot"), .sample_dram or .sample_pool)
    "raw": ("base", "hot"),
    "raw_dram": ("base", "dram"),
    "raw_huge": ("huge", "hot"),
    "raw_huge_dram": ("huge", "dram"),
    "raw_huge_pool": ("huge", "pool"),
}


def decile(samples: list[float]) -> float:
    """The 10th percentile (the slow tail of a list of GB/s)."""
    return statistics.quantiles(samples, n=10, method="inclusive")[0] if len(samples) > 1 else samples[0]


def measure(repeats: int, transfer_samples: int, threads: int, ucx_tls: str | None,
            keep_warm_s: float | None) -> tuple[dict, dict, dict]:
    engine_args = ["--dtype", "bfloat16", "--threads", str(threads), "--max-model-len", "4608",
                   "--max-num-batched-tokens", "4608", "--kv-cache-memory", f"{KV_CACHE_MIB}MiB"]
    if keep_warm_s is not None:
        engine_args += ["--kv-keep-warm-interval", str(keep_warm_s)]
    kv_args = ["--ucx-transports", ucx_tls] if ucx_tls else []
    workers = [Worker("prefill", engine_args + kv_args), Worker("decode", engine_args + kv_args),
               Worker("serve", engine_args)]
    prefill, decode, serve = workers
    rng = random.Random(0)
    raw_cases, engine_cases, ttft_cases = [], [], []
    readers: dict[str, RawReader] = {}
    try:
        readers["base"] = RawReader(ucx_tls, huge_pages=False)
        readers["huge"] = RawReader(ucx_tls, huge_pages=True, pool_bytes=KV_CACHE_MIB << 20)
        layout = readers["base"].layout
        for w in workers:
            w.wait_healthy()
        with httpx.Client(timeout=600) as client:
            # Warm-up: first requests pay for lazy initialisation and (disaggregated) the handshake + UCX connect.
            for _ in range(2):
                body = request_body(rng, 64)
                aggregated(client, serve, body)
                disaggregated(client, prefill, decode, body)
            for tokens in PROMPT_TOKENS:
                num_bytes = tokens // layout.block_size * layout.bytes_per_block_all_layers
                agg, dis, pre, rates, wall_rates, setup_ms, blocks = [], [], [], [], [], [], []
                raw_s: dict[str, list[raw_bench.ReadTiming]] = {name: [] for name in BASELINES}
                block_s: dict[str, list[float]] = {kind: [] for kind in readers}
                for i in range(max(repeats, transfer_samples)):
                    timed = i < repeats  # a TTFT sample too: aggregated and disaggregated alternate
                    if timed:
                        agg.append(aggregated(client, serve, request_body(rng, tokens)))
                    before = client.get(f"{decode.url}/metrics").text
                    timing, round_trip, params = disaggregated(client, prefill, decode, request_body(rng, tokens))
                    after = client.get(f"{decode.url}/metrics").text
                    if timed:
                        dis.append(timing)
                        pre.append(round_trip)
                    moved = metric(after, "tandem:kv_transfer_bytes_total") - metric(before, "tandem:kv_transfer_bytes_total")
                    seconds, wall = (metric(after, f"tandem:kv_transfer_{name}_seconds_sum")
                                     - metric(before, f"tandem:kv_transfer_{name}_seconds_sum") for name in ("duration", "wall"))
                    if moved <= 0 or seconds <= 0 or wall <= 0:
                        raise RuntimeError(f"{tokens} tokens: the decode worker moved no KV ({moved} bytes)")
                    rates.append(moved / seconds / 1e9)
                    wall_rates.append(moved / wall / 1e9)
                    setup_ms.append((wall - seconds) * 1e3)
                    blocks.append(len(params["remote_block_ids"]))
                    # One READ of every baseline right after each engine READ: the same number of samples, taken
                    # under the same machine load, so their medians (and tails) compare like with like.
                    for name, (kind, how) in BASELINES.items():
                        if how == "dram":
                            raw_s[name].append(readers[kind].sample_dram(tokens))
                        elif how == "pool":
                            raw_s[name].append(readers[kind].sample_pool(tokens))
                        else:
                            r_s, b_s = readers[kind].sample(tokens)
                            raw_s[name].append(r_s)
                            block_s[kind].append(b_s)
                    # Let the prefill's completion notice land so both workers are idle before the next run.
                    time.sleep(0.05)
                ttft_cases.append(ttft_case(tokens, agg, dis, pre))
                raw_case = {"prompt_tokens": tokens, "blocks": tokens // layout.block_size, "bytes": num_bytes}
                for name in BASELINES:
                    raw_case[f"{name}_gbps"] = raw_bench.gbps(num_bytes, statistics.median(t.transfer_s for t in raw_s[name]))
                    raw_case[f"{name}_wall_gbps"] = raw_bench.gbps(num_bytes, statistics.median(t.wall_s for t in raw_s[name]))
                    raw_case[f"{name}_setup_ms"] = statistics.median(t.wall_s - t.transfer_s for t in raw_s[name]) * 1e3
                for kind, suffix in (("base", ""), ("huge", "_huge")):
                    raw_case[f"transport_block{suffix}_gbps"] = raw_bench.gbps(num_bytes, statistics.median(block_s[kind]))
                    raw_case[f"transport{suffix}_ratio_to_raw"] = (raw_case[f"transport_block{suffix}_gbps"]
                                                                  / raw_case[f"raw{suffix}_gbps"])
                raw_cases.append(raw_case)
                engine_case = {"prompt_tokens": tokens, "blocks_pulled": blocks[-1], "reads": len(rates),
                               "engine_block_gbps": statistics.median(rates), "samples_gbps": rates,
                               "engine_p10_gbps": decile(rates),
                               "engine_wall_gbps": statistics.median(wall_rates), "wall_samples_gbps": wall_rates,
                               "engine_setup_ms": statistics.median(setup_ms), "setup_samples_ms": setup_ms}
                for name in BASELINES:
                    raw_rates = [raw_bench.gbps(num_bytes, t.transfer_s) for t in raw_s[name]]
                    raw_wall = [raw_bench.gbps(num_bytes, t.wall_s) for t in raw_s[name]]
                    raw_case[f"{name}_samples_gbps"] = raw_rates
                    raw_case[f"{name}_p10_gbps"] = decile(raw_rates)
                    # The goal's figure: median engine READ over median raw READ of the same window.
                    engine_case[f"ratio_to_{name}"] = statistics.median(rates) / statistics.median(raw_rates)
                    engine_case[f"p10_ratio_to_{name}"] = decile(rates) / decile(raw_rates)
                    paired = [e / r for e, r in zip(rates, raw_rates)]
                    engine_case[f"paired_ratios_{name}"] = paired
                    engine_case[f"paired_ratio_{name}"] = statistics.median(paired)
                    engine_case[f"wall_ratio_to_{name}"] = statistics.median(wall_rates) / statistics.median(raw_wall)
                    # How often an engine READ, and a raw READ, fell below 0.8 x the raw median: the tails.
                    floor = 0.8 * statistics.median(raw_rates)
                    engine_case[f"below_goal_fraction_{name}"] = sum(r < floor for r in rates) / len(rates)
                    raw_case[f"{name}_below_goal_fraction"] = sum(r < floor for r in raw_rates) / len(raw_rates)
                engine_cases.append(engine_case)
                print(f"  {tokens} tokens: agg {ttft_cases[-1]['aggregated_ttft_ms']:.1f} ms, "
                      f"disagg {ttft_cases[-1]['disaggregated_ttft_ms']:.1f} ms, "
                      f"engine transfer {engine_case['engine_block_gbps']:.2f} GB/s", flush=True)
    finally:
        for reader in readers.values():
            reader.close()
        for w in workers:
            w.stop()
    raw_result = {"cases": raw_cases, "bytes_per_block_all_layers": raw_bench.smol_layout(1).bytes_per_block_all_layers}
    return raw_result, {"cases": engine_cases}, {"cases": ttft_cases, "threads_per_engine": threads}


def report(results: dict) -> None:
    """Print the tables of one run's results (as ``main`` writes them to JSON)."""
    raw, engine, ttft = results["raw"], results["engine"], results["ttft"]
    print(f"\nKV block transfer, GB/s, timed by NIXL (post -> completion) on both sides; medians of {results['transfer_samples']} "
          "engine READs and of as many READs of every raw baseline, one taken right after each engine READ (raw: one-region "
          "NIXL READ of the same byte count; 4K = ordinary torch buffers, HP = huge-page buffers like the engine's pool; "
          "hot = same bytes again, DRAM = caches swept first)")
    print(f"{'tokens':>6} {'MB':>6} {'raw 4K hot':>10} {'4K DRAM':>8} {'HP hot':>7} {'HP DRAM':>8} {'transport HP':>12} "
          f"{'engine':>7} | {'engine/':>7} {'engine/':>8} {'engine/':>7} {'engine/':>8} | {'goal':>4} {'HP':>4}")
    print(f"{'':>6} {'':>6} {'':>10} {'':>8} {'':>7} {'':>8} {'':>12} {'':>7} | {'4K hot':>7} {'4K DRAM':>8} "
          f"{'HP hot':>7} {'HP DRAM':>8} | {'':>4} {'':>4}")
    for r, e in zip(raw["cases"], engine["cases"]):
        verdicts = ["met" if e[f"ratio_to_{name}"] >= 0.8 else "NOT" for name in ("raw_dram", "raw_huge_dram")]
        print(f"{r['prompt_tokens']:>6} {r['bytes'] / 1e6:6.1f} {r['raw_gbps']:10.2f} {r['raw_dram_gbps']:8.2f} "
              f"{r['raw_huge_gbps']:7.2f} {r['raw_huge_dram_gbps']:8.2f} {r['transport_block_huge_gbps']:12.2f} "
              f"{e['engine_block_gbps']:7.2f} | {e['ratio_to_raw']:7.2f} {e['ratio_to_raw_dram']:8.2f} "
              f"{e['ratio_to_raw_huge']:7.2f} {e['ratio_to_raw_huge_dram']:8.2f} | {verdicts[0]:>4} {verdicts[1]:>4}")
    print("(goal: engine >= 0.8 x raw NIXL DRAM->DRAM on a buffer of the same size, as a NIXL user allocates one (4K); "
          "'HP': the same against huge-page buffers like the engine's own pool, a stricter check. The hot READs find "
          "their bytes in the CPU's caches, which an engine's READ of a prompt just computed elsewhere does not)")
    print("\nThe slow tail against raw HP DRAM: 10th percentiles, per-READ pairs, and how often a READ fell below 0.8 x the "
          "raw median; and raw HP 'pool' READs: each into the next stretch of a huge-page destination as large as an "
          f"engine's KV pool ({KV_CACHE_MIB} MiB), as old as the free blocks an engine's READ lands in")
    print(f"{'tokens':>6} {'engine p10':>10} {'raw p10':>8} {'p10 ratio':>9} {'paired median':>13} {'engine < goal':>13} "
          f"{'raw < goal':>10} | {'raw HP pool':>11} {'pool p10':>8} {'engine/pool':>11}")
    for r, e in zip(raw["cases"], engine["cases"]):
        print(f"{r['prompt_tokens']:>6} {e['engine_p10_gbps']:10.2f} {r['raw_huge_dram_p10_gbps']:8.2f} "
              f"{e['p10_ratio_to_raw_huge_dram']:9.2f} {e['paired_ratio_raw_huge_dram']:13.2f} "
              f"{e['below_goal_fraction_raw_huge_dram']:13.0%} {r['raw_huge_dram_below_goal_fraction']:10.0%} | "
              f"{r['raw_huge_pool_gbps']:11.2f} {r['raw_huge_pool_p10_gbps']:8.2f} {e['ratio_to_raw_huge_pool']:11.2f}")
    print("\nThe same READs on the reader's own clock (+ building the NIXL request, + waits for the GIL), GB/s")
    print(f"{'tokens':>6} {'raw 4K DRAM':>11} {'raw HP DRAM':>11} {'engine':>7} | {'engine/':>8} {'engine/':>8} | "
          f"{'setup ms':>8} {'setup ms':>8}")
    print(f"{'':>6} {'':>11} {'':>11} {'':>7} | {'4K DRAM':>8} {'HP DRAM':>8} | {'raw':>8} {'engine':>8}")
    for r, e in zip(raw["cases"], engine["cases"]):
        print(f"{r['prompt_tokens']:>6} {r['raw_dram_wall_gbps']:11.2f} {r['raw_huge_dram_wall_gbps']:11.2f} "
              f"{e['engine_wall_gbps']:7.2f} | {e['wall_ratio_to_raw_dram']:8.2f} {e['wall_ratio_to_raw_huge_dram']:8.2f} | "
              f"{r['raw_huge_dram_setup_ms']:8.3f} {e['engine_setup_ms']:8.3f}")
    print(f"\nTime to first token, ms, medians of {results['repeats']} alternating pairs (every engine --threads {ttft['threads_per_engine']}). "
          "'added' = disaggregated minus aggregated; 'compute removed' = the same per pair after taking out the prompt's "
          "compute as the computing engine timed it (vllm:request_prefill_time_seconds); 'decode hop' = disaggregated TTFT "
          "minus the prefill round trip; '2nd token' waits for the KV transfer and the decode worker's first step")
    print(f"{'tokens':>6} {'aggregated':>10} {'disaggregated':>13} {'added':>8} {'compute removed':>15} {'decode hop':>10} | "
          f"{'2nd token agg':>13} {'disagg':>8} {'added, compute removed':>22} | {'goal':>4}")
    for t in ttft["cases"]:
        goal = f"{'met' if t['added_compute_removed_ms'] < 15 else 'NOT':>4}" if t["prompt_tokens"] == 1024 else ""
        print(f"{t['prompt_tokens']:>6} {t['aggregated_ttft_ms']:10.1f} {t['disaggregated_ttft_ms']:13.1f} "
              f"{t['added_ms']:8.1f} {t['added_compute_removed_ms']:15.1f} {t['decode_hop_ttft_ms']:10.1f} | "
              f"{t['aggregated_second_token_ms']:13.1f} {t['disaggregated_second_token_ms']:8.1f} "
              f"{t['second_token_added_compute_removed_ms']:22.1f} | {goal}")
    print("(goal: disaggregation adds < 15 ms to TTFT at 1,024 tokens, judged on 'compute removed')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/kv_transfer.json")
    parser.add_argument("--repeats", type=int, default=5, help="TTFT samples per prompt length (default 5)")
    parser.add_argument("--transfer-samples", type=int, default=15,
                        help="engine READs per prompt length, each followed by one READ of every raw baseline "
                             "(default 15; the first --repeats of them are the disaggregated TTFT samples)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every engine (default 1)")
    parser.add_argument("--ucx-tls", default=None, help="UCX_TLS for every NIXL agent (default: UCX's own)")
    parser.add_argument("--kv-keep-warm-interval", type=float, default=None, metavar="SECONDS",
                        help="the engines' --kv-keep-warm-interval (default: theirs; 0 = off)")
    parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    if args.repeats < 1 or args.transfer_samples < 2:
        parser.error("--repeats must be >= 1 and --transfer-samples >= 2")

    print("prefill + decode vs serve, raw NIXL baselines interleaved ...", flush=True)
    raw, engine, ttft = measure(args.repeats, args.transfer_samples, args.threads, args.ucx_tls,
                                args.kv_keep_warm_interval)
    results = {
        "raw": raw,
        "engine": engine,
        "ttft": ttft,
        "model": MODEL,
        "dtype": "bfloat16",
        "ucx_tls": args.ucx_tls or "default",
        "kv_keep_warm_interval_s": args.kv_keep_warm_interval,
        "repeats": args.repeats,
        "transfer_samples": args.transfer_samples,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "transparent_hugepage": transparent_huge_pages_mode()},
        "goals": {"engine_block_ratio_to_raw": ">= 0.8", "added_ttft_ms_at_1024": "< 15"},
        "kv_cache_mib": KV_CACHE_MIB,
    }

    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
