"""Routing benchmark: prefix-aware vs round-robin on a multi-tenant workload, and the router's own overhead.

    .venv/bin/python benchmarks/routing.py                 # both parts
    .venv/bin/python benchmarks/routing.py --only overhead # no model needed
    .venv/bin/python benchmarks/routing.py --only fault    # a worker killed and restarted under load
    .venv/bin/python benchmarks/routing.py --only routing --engine vllm --engine-python ~/.cache/tandem/vllm-venv/bin/python

Part 1 (``routing``) starts 2 aggregated ``tandem serve`` workers and, for each policy, a router in front of
them, then sends a multi-tenant workload (several long shared system prompts, many short questions). Each
policy gets its own fresh tenants, so neither profits from the other's cache. The prefix hit rate is read
from the engines' own ``vllm:prefix_cache_{hits,queries}_total``; TTFT and throughput from the client.
With ``--engine vllm`` the 2 workers are vLLM-CPU OpenAI servers (a core each, eager, ``--vllm-kv-blocks``
blocks of KV cache) whose ZMQ KV events feed the prefix-aware router.

Part 2 (``overhead``) measures what the router adds: an upstream that answers instantly (a raw asyncio HTTP
server speaking the worker contract), N concurrent streaming clients (raw asyncio, keep-alive), first run
straight against the upstream, then through ``tandem router`` (in front of two such upstreams, so the whole
tokenize -> hash -> score -> pick pipeline runs); the added latency is the difference of time-to-first-byte
percentiles between the two runs. Clients pause between requests (``--overhead-think``), so the router sees
1,000 open client connections at a rate it can sustain; ``--overhead-think 0`` saturates it instead.

Part 3 (``fault``) runs steady streaming load over 2 workers behind the router, SIGKILLs the busiest worker a
quarter of the way in and restarts it (same port) at half way; it reports throughput and TTFT before, during and
after the outage, and requests lost (an error or fewer tokens than asked: the goal is 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tandem.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
TANDEM = [sys.executable, "-m", "tandem.cli"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            reply = httpx.get(url + "/health", timeout=1)
            if reply.status_code == 200:
                return
            if "engine_dead" in reply.text:
                raise RuntimeError(f"{url}: {reply.text}")
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not healthy after {timeout_s}s")


def start(argv: list[str], env: dict[str, str] | None = None, quiet: bool = True) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.DEVNULL if quiet else None)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# Part 2: router overhead
# ---------------------------------------------------------------------------------------------------------------


class InstantUpstream(asyncio.Protocol):
    """A minimal HTTP/1.1 worker that answers at once: /health, /v1/models, /metrics, the KV-event channel, and
    completions (streaming: ``chunks`` SSE events, the first at once, then one every ``interval_s``)."""

    chunks = 4
    interval_s = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self.handle(method, path, body)

    def send(self, status: str, body: bytes, content_type: str = "application/json") -> None:
        self.transport.write(f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
                             .encode() + body)

    def chunk(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def handle(self, method: str, path: str, body: bytes) -> None:
        if path == "/health":
            self.send("200 OK", b'{"status":"ok"}')
        elif path == "/v1/models":
            self.send("200 OK", b'{"object":"list","data":[{"id":"m","object":"model"}]}')
        elif path == "/metrics":
            self.send("200 OK", b'vllm:num_requests_waiting{model_name="m"} 0\n', "text/plain")
        elif path == "/kv_events/stream":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
            self.chunk(json.dumps({"kind": "snapshot", "worker": self.url, "model": "m", "seq": 0, "block_size": 16,
                                   "block_hashes": []}).encode() + b"\n")
            self.heartbeat()
        elif method == "POST" and path.startswith("/v1/"):
            request = json.loads(body)
            if not request.get("stream"):
                self.send("200 OK", b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"ok","finish_reason":"length"}]}')
                return
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            self.event(0)
        else:
            self.send("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}')

    def heartbeat(self) -> None:
        if self.closed:
            return
        self.chunk(json.dumps({"kind": "heartbeat", "worker": self.url, "model": "m", "seq": 0, "ts": time.time()}).encode()
                   + b"\n")
        asyncio.get_running_loop().call_later(1.0, self.heartbeat)

    def event(self, i: int) -> None:
        if self.closed:
            return
        if i == self.chunks:
            self.chunk(b"data: [DONE]\n\n")
            self.transport.write(b"0\r\n\r\n")
            return
        self.chunk(b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":"t%d ","finish_reason":null}]}\n\n' % i)
        if self.interval_s:
            asyncio.get_running_loop().call_later(self.interval_s, self.event, i + 1)
        else:
            self.event(i + 1)


def serve_instant_upstream(ports: list[int], chunks: int, interval_s: float) -> None:
    """Run instant upstreams (one per port: the router gets two workers, so its whole picking pipeline runs)
    until killed, in their own process so they do not share the client's CPU time slice."""
    import uvloop

    InstantUpstream.chunks = chunks
    InstantUpstream.interval_s = interval_s

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for port in ports:
            protocol = type("Upstream", (InstantUpstream,), {"url": f"http://127.0.0.1:{port}"})
            servers.append(await loop.create_server(protocol, "127.0.0.1", port, backlog=4096))
        await asyncio.gather(*(server.serve_forever() for server in servers))

    uvloop.run(main())


@dataclass
class LoadResult:
    ttfb_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0
    elapsed_s: float = 0.0


async def _read_chunked_stream(reader: asyncio.StreamReader, on_first: Callable[[], None]) -> bytes:
    """Read one HTTP/1.1 response (chunked or sized); call ``on_first`` when the first body bytes arrive."""
    status = await reader.readline()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad status {status!r}")
    chunked, length = False, None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "content-length":
            length = int(value)
    if not chunked:
        body = await reader.readexactly(length or 0)
        on_first()
        return body
    body = b""
    first = True
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            return body
        data = await reader.readexactly(size + 2)
        if first:
            on_first()
            first = False
        body += data[:-2]


async def run_load(port: int, clients: int, duration_s: float, warmup_s: float, think_s: float) -> LoadResult:
    """``clients`` keep-alive connections, each sending a streaming completion, reading it to the end, then
    pausing for an exponentially distributed think time (mean ``think_s``; 0: back to back)."""
    result = LoadResult()
    request_body = json.dumps({"model": "m", "prompt": "Hello there, how are you?", "max_tokens": 4, "stream": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(request_body), request_body))
    # NOTE: perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    clock = time.perf_counter
    begin = clock()
    measure_from = begin + warmup_s
    end = measure_from + duration_s

    async def client(index: int) -> None:
        # Stagger connection setup so the measurement sees steady state, not a thundering herd.
        await asyncio.sleep(warmup_s * 0.5 * index / clients)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rng = random.Random(index)
        try:
            while clock() < end:
                if think_s:
                    await asyncio.sleep(rng.expovariate(1 / think_s))
                sent = clock()
                first: list[float] = []
                writer.write(request)
                try:
                    body = await _read_chunked_stream(reader, lambda: first.append(clock()))
                    ok = body.rstrip().endswith(b"data: [DONE]")
                except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError):
                    ok = False
                done = clock()
                if sent >= measure_from and done <= end:
                    result.requests += 1
                    if ok and first:
                        result.ttfb_s.append(first[0] - sent)
                        result.total_s.append(done - sent)
                    else:
                        result.errors += 1
                if not ok:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    result.elapsed_s = duration_s
    return result


def load_in_subprocess(port: int, clients: int, duration_s: float, warmup_s: float, think_s: float) -> LoadResult:
    """Run the load generator in its own process (uvloop), so its CPU use is separate from the orchestrator."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # NOTE: results go through a file: uvloop makes stdout non-blocking, and a big print to a pipe gets cut.
        proc = subprocess.run([sys.executable, __file__, "--_load", str(port), str(clients), str(duration_s),
                               str(warmup_s), str(think_s), out.name], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return LoadResult(**json.loads(Path(out.name).read_text()))


def _load_summary(res: LoadResult) -> dict:
    return {"requests": res.requests, "errors": res.errors, "rps": res.requests / res.elapsed_s,
            "ttfb_p50_ms": percentile(res.ttfb_s, 50) * 1e3, "ttfb_p99_ms": percentile(res.ttfb_s, 99) * 1e3}


def overhead(args: argparse.Namespace) -> dict:
    """Part 2: TTFB through the router minus TTFB straight to the upstream, at the same concurrency.

    The two loads alternate for ``--overhead-rounds`` rounds (direct first in even rounds, routed first in odd
    ones), and the headline is the median over rounds of each round's difference: a shared machine's load drifts
    over a minute, and a single direct-then-routed pair charges that drift to the router.
    """
    up_port, up_port2, router_port = free_port(), free_port(), free_port()
    procs = [start([sys.executable, __file__, "--_upstream", f"{up_port},{up_port2}", str(args.overhead_chunks),
                    str(args.overhead_interval)])]
    rounds, direct_all, routed_all = [], LoadResult(), LoadResult()
    span = args.overhead_warmup + args.overhead_duration
    try:
        router = start([*TANDEM, "router", "--port", str(router_port), "--served-model-name", "m",
                        "--worker", f"http://127.0.0.1:{up_port}", "--worker", f"http://127.0.0.1:{up_port2}",
                        "--log-level", "warning", *args.router_arg], quiet=False)
        procs.append(router)
        wait_healthy(f"http://127.0.0.1:{router_port}", router, 120)
        time.sleep(1.5)  # the router's first health round has marked the upstream healthy
        for index in range(args.overhead_rounds):
            runs: dict[str, LoadResult] = {}
            cpu_s = 0.0
            for name in ("direct", "router") if index % 2 == 0 else ("router", "direct"):
                print(f"  overhead round {index + 1}/{args.overhead_rounds}: {name} ...", flush=True)
                cpu_before = process_cpu_s(router.pid)
                runs[name] = load_in_subprocess(router_port if name == "router" else up_port, args.overhead_clients,
                                                args.overhead_duration, args.overhead_warmup, args.overhead_think)
                if name == "router":
                    cpu_s = process_cpu_s(router.pid) - cpu_before
            direct, routed = _load_summary(runs["direct"]), _load_summary(runs["router"])
            rounds.append({"direct": direct, "router": routed,
                           "added_p50_ms": routed["ttfb_p50_ms"] - direct["ttfb_p50_ms"],
                           "added_p99_ms": routed["ttfb_p99_ms"] - direct["ttfb_p99_ms"],
                           # CPU time is steadier than latency on a shared machine (warm-up included, so the
                           # requests are counted over the same span).
                           "router_cpu_ms_per_request": cpu_s / max(1.0, routed["rps"] * span) * 1e3})
            for total, res in ((direct_all, runs["direct"]), (routed_all, runs["router"])):
                total.requests += res.requests
                total.errors += res.errors
                total.ttfb_s += res.ttfb_s
                total.elapsed_s += res.elapsed_s
    finally:
        stop(procs)
    report = {"rounds": rounds, "direct": _load_summary(direct_all), "router": _load_summary(routed_all)}
    for key in ("added_p50_ms", "added_p99_ms", "router_cpu_ms_per_request"):
        report[key] = statistics.median(r[key] for r in rounds)
    return report


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------------
# Part 1: prefix-aware vs round-robin on a multi-tenant workload with real engines
# ---------------------------------------------------------------------------------------------------------------

TOPICS = ["billing", "weather", "shipping", "recipes", "astronomy", "gardening", "football", "chess", "history",
          "music", "travel", "insurance", "medicine", "law", "poetry", "cars"]
QUESTIONS = ["What is the first step?", "Give me one tip.", "What should I avoid?", "Summarize it.",
             "Is it expensive?", "How long does it take?", "Who can help me?", "Why does it matter?"]


def tenant_prompts(seed: int, tenants: int, words: int) -> list[str]:
    """Long, distinct system prompts; a fresh set per seed so runs never share cached prefixes."""
    rng = random.Random(seed)
    prompts = []
    for t in range(tenants):
        topic = TOPICS[t % len(TOPICS)]
        filler = " ".join(rng.choice(["policy", "customer", "detail", "answer", "rule", "case", "note", "example",
                                      "context", "record", "section", "clause"]) + str(rng.randrange(1000))
                          for _ in range(words))
        prompts.append(f"You are the {topic} assistant for tenant {seed}-{t}. Follow these notes: {filler}")
    return prompts


async def engine_prefix_counters(urls: list[str]) -> tuple[float, float]:
    import httpx

    hits = queries = 0.0
    async with httpx.AsyncClient() as http:
        for url in urls:
            for line in (await http.get(url + "/metrics")).text.splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def multi_tenant_run(router_url: str, worker_urls: list[str], model: str, systems: list[str], requests: int,
                           concurrency: int, max_tokens: int, seed: int) -> dict:
    import openai

    rng = random.Random(seed)
    work = [(rng.choice(systems), rng.choice(QUESTIONS)) for _ in range(requests)]
    client = openai.AsyncOpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0, timeout=600)
    # Warm-up, not measured: each tenant's first request can only miss, under any policy.
    for system in systems:
        await client.chat.completions.create(model=model, max_tokens=1, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": "Hello"}])
    await asyncio.sleep(0.5)  # let the KV events reach the router
    hits0, queries0 = await engine_prefix_counters(worker_urls)
    ttfts: list[float] = []
    errors = 0
    tokens = 0
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def user() -> None:
        nonlocal errors, tokens
        while not queue.empty():
            system, question = queue.get_nowait()
            sent = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                    max_tokens=max_tokens, temperature=0, stream=True)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        tokens += 1
                        if first is None:
                            first = time.perf_counter() - sent
            except openai.APIError:
                errors += 1
                continue
            if first is not None:
                ttfts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    hits1, queries1 = await engine_prefix_counters(worker_urls)
    return {"requests": requests, "errors": errors, "hit_rate": (hits1 - hits0) / max(1.0, queries1 - queries0),
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3, "ttft_p90_ms": percentile(ttfts, 90) * 1e3,
            "req_per_s": requests / elapsed, "tokens_per_s": tokens / elapsed}


def start_vllm_workers(args: argparse.Namespace) -> tuple[list[subprocess.Popen], list[str], list[str]]:
    """``--engine vllm``: 2 aggregated vLLM OpenAI servers (a core each) from ``--engine-python``; returns the
    processes, their URLs and the router flags naming them (with their KV-event endpoints)."""
    from tandem.engine.model_files import ensure_converted
    from tandem.worker.vllm import find_vllm_python, share_cores, vllm_worker

    python = find_vllm_python(args.engine_python)
    model_dir = str(ensure_converted(args.model).weights_dir)
    # A small KV cache, as for Tandem's workers: about half the tenants' prefixes fit in one worker.
    engine_args = ["--enforce-eager", "--max-model-len", str(args.max_model_len),
                   "--num-gpu-blocks-override", str(args.vllm_kv_blocks), *args.worker_arg]
    procs, urls, flags = [], [], []
    for cpus in share_cores(2):
        worker = vllm_worker(python, "aggregated", model_dir, args.model, free_port(), free_port(),
                             engine_args=engine_args, cpus=cpus)
        procs.append(start(worker.argv, worker.env))
        urls.append(worker.url)
        flags += worker.router_flag
    return procs, urls, flags


def routing(args: argparse.Namespace) -> dict:
    """Part 1: the same workload shape through a prefix-aware and a round-robin router over 2 workers."""
    if args.engine == "vllm":
        procs, worker_urls, router_flags = start_vllm_workers(args)
        try:
            for proc, url in zip(procs, worker_urls):
                wait_healthy(url, proc)
            return routing_rounds(args, worker_urls, router_flags)
        finally:
            stop(procs)
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = {"TANDEM_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    worker_ports = [free_port(), free_port()]
    worker_urls = [f"http://127.0.0.1:{p}" for p in worker_ports]
    procs = []
    results = {}
    try:
        for port, url in zip(worker_ports, worker_urls):
            procs.append(start([*TANDEM, "serve", "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url,
                                "--model", args.model, "--kv-cache-memory", args.kv_cache_memory,
                                "--max-model-len", str(args.max_model_len),
                                *args.worker_arg], env))
        for proc, url in zip(procs, worker_urls):
            wait_healthy(url, proc)
        results = routing_rounds(args, worker_urls, sum((["--worker", u] for u in worker_urls), []))
    finally:
        stop(procs)
    return results


def routing_rounds(args: argparse.Namespace, worker_urls: list[str], router_flags: list[str]) -> dict:
    """One router per policy in front of the running workers, each with fresh tenants."""
    results = {}
    for seed, policy in enumerate(("prefix", "round_robin"), start=1):
        router_port = free_port()
        router = start([*TANDEM, "router", "--port", str(router_port), "--model", args.model, "--policy", policy,
                        *router_flags, "--log-level", "warning"], quiet=False)
        try:
            wait_healthy(f"http://127.0.0.1:{router_port}", router, 120)
            time.sleep(1.5)  # health round + KV-event snapshots
            systems = tenant_prompts(seed, args.tenants, args.system_words)
            results[policy] = asyncio.run(multi_tenant_run(
                f"http://127.0.0.1:{router_port}", worker_urls, args.model, systems, args.requests,
                args.concurrency, args.max_tokens, seed))
        finally:
            stop([router])
    results["ttft_p90_speedup"] = results["round_robin"]["ttft_p90_ms"] / results["prefix"]["ttft_p90_ms"]
    return results


async def fault_load(router_url: str, model: str, args: argparse.Namespace, events: dict[str, float],
                     on_start: Callable[[], None]) -> list[dict]:
    """Streams from ``--concurrency`` users until the restarted worker has served for a quarter of
    ``--fault-duration`` (at least ``--fault-duration`` seconds in all); one record per request."""
    import openai

    client = openai.AsyncOpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0, timeout=600)
    records: list[dict] = []
    started = time.perf_counter()
    on_start()

    def running() -> bool:
        elapsed = time.perf_counter() - started
        if "healthy_at" in events:
            return elapsed < max(args.fault_duration, events["healthy_at"] + args.fault_duration / 4)
        return elapsed < args.fault_duration * 10  # the restart has not finished yet (bounded all the same)

    async def user(u: int) -> None:
        i = 0
        while running():
            i += 1
            sent = time.perf_counter()
            first = None
            usage = None
            error = None
            try:
                stream = await client.chat.completions.create(
                    model=model, max_tokens=args.fault_max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": f"User {u} asks question {i}: tell me a long story."}])
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - sent
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
            except openai.APIError as exc:
                error = str(exc)[:200]
            records.append({"sent": sent - started, "done": time.perf_counter() - started, "ttft": first,
                            "tokens": usage or 0, "error": error,
                            "lost": error is not None or usage != args.fault_max_tokens})

    await asyncio.gather(*(user(u) for u in range(args.concurrency)))
    await client.close()
    return records


def _phase(records: list[dict], start: float, end: float) -> dict:
    """Requests sent in [start, end): throughput (tokens of those requests over the phase), TTFT, lost."""
    inside = [r for r in records if start <= r["sent"] < end]
    ttfts = [r["ttft"] for r in inside if r["ttft"] is not None]
    span = max(1e-9, end - start)
    return {"requests": len(inside), "lost": sum(r["lost"] for r in inside),
            "tokens_per_s": sum(r["tokens"] for r in inside) / span,
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3 if ttfts else None,
            "ttft_p90_ms": percentile(ttfts, 90) * 1e3 if ttfts else None}


def fault(args: argparse.Namespace) -> dict:
    """The fault round: steady streaming load over 2 workers; the busiest is SIGKILLed at a quarter of the run
    and restarted at half; throughput, TTFT and requests lost before, during and after (goal: none lost)."""
    import httpx

    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = {"TANDEM_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]

    def worker(port: int, url: str) -> subprocess.Popen:
        return start([*TANDEM, "serve", "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url,
                      "--model", args.model, "--kv-cache-memory", args.kv_cache_memory,
                      "--max-model-len", str(args.max_model_len), *args.worker_arg], env)

    workers = {url: worker(port, url) for port, url in zip(ports, urls)}
    router_port = free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    router = start([*TANDEM, "router", "--port", str(router_port), "--model", args.model, "--health-interval", "0.5",
                    "--outlier-base-ejection", "1", *sum((["--worker", u] for u in urls), []),
                    "--log-level", "warning"], quiet=False)
    events: dict[str, float] = {}
    try:
        for url, proc in workers.items():
            wait_healthy(url, proc)
        wait_healthy(router_url, router, 120)
        time.sleep(1.5)

        def chaos() -> None:
            t0 = time.perf_counter()
            time.sleep(args.fault_duration / 4)
            health = httpx.get(router_url + "/health").json()["workers"]
            victim = max(health, key=lambda w: w["inflight"])["url"]
            os.killpg(workers[victim].pid, signal.SIGKILL)
            workers[victim].wait()
            events["killed_at"] = time.perf_counter() - t0
            time.sleep(max(0.0, args.fault_duration / 2 - (time.perf_counter() - t0)))
            workers[victim] = worker(int(victim.rsplit(":", 1)[1]), victim)
            events["restarted_at"] = time.perf_counter() - t0
            wait_healthy(victim, workers[victim])
            events["healthy_at"] = time.perf_counter() - t0

        import threading

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        records = asyncio.run(fault_load(router_url, args.model, args, events, chaos_thread.start))
        chaos_thread.join(timeout=600)
        migrations = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(router_url + "/metrics").text.splitlines()
                         if line.startswith("tandem:router_migrations_total{"))
    finally:
        stop([router, *workers.values()])
    killed, healthy = events.get("killed_at", 0.0), events.get("healthy_at", args.fault_duration)
    end = max(r["done"] for r in records) if records else healthy
    return {"duration_s": args.fault_duration, "concurrency": args.concurrency, "max_tokens": args.fault_max_tokens,
            "events": events, "migrations": migrations, "requests": len(records),
            "lost": sum(r["lost"] for r in records),
            "errors": sorted({r["error"] for r in records if r["error"]})[:5],
            "before": _phase(records, 0.0, killed), "outage": _phase(records, killed, healthy),
            "after": _phase(records, healthy, end)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_upstream":
        serve_instant_upstream([int(p) for p in sys.argv[2].split(",")], int(sys.argv[3]), float(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        import uvloop

        port, clients, duration, warmup, think = (int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]),
                                                  float(sys.argv[5]), float(sys.argv[6]))
        res = uvloop.run(run_load(port, clients, duration, warmup, think))
        Path(sys.argv[7]).write_text(json.dumps(res.__dict__))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("routing", "overhead", "fault"), default=None)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--system-words", type=int, default=120, help="filler words per system prompt")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-memory", default="64MB",
                        help="each worker's KV cache: about half the tenants' prefixes fit in one worker")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra argument for every worker (`tandem serve`, or vLLM's server with --engine vllm)")
    parser.add_argument("--router-arg", action="append", default=[],
                        help="extra argument for the overhead part's `tandem router` (e.g. --router-arg=--max-migrations=0)")
    parser.add_argument("--engine", choices=("tandem", "vllm"), default="tandem",
                        help="routing part: the workers' engine (vllm: vLLM-CPU servers from --engine-python)")
    parser.add_argument("--engine-python", default=None,
                        help="--engine vllm: python of an environment with vLLM (default: `python` on PATH; "
                             "`make vllm-env` builds ~/.cache/tandem/vllm-venv)")
    parser.add_argument("--vllm-kv-blocks", type=int, default=96,
                        help="--engine vllm: KV-cache blocks (of 32 tokens) per worker, about as many tokens as --kv-cache-memory gives Tandem")
    parser.add_argument("--overhead-clients", type=int, default=1000)
    parser.add_argument("--overhead-duration", type=float, default=10.0)
    parser.add_argument("--overhead-warmup", type=float, default=4.0)
    parser.add_argument("--overhead-think", type=float, default=5.0,
                        help="mean pause between a client's requests, seconds (0: back to back, saturating)")
    parser.add_argument("--overhead-rounds", type=int, default=3,
                        help="alternating direct/routed load pairs; the median difference is reported")
    parser.add_argument("--overhead-chunks", type=int, default=4)
    parser.add_argument("--overhead-interval", type=float, default=0.0,
                        help="seconds between streamed chunks (0: the whole answer at once)")
    parser.add_argument("--fault-duration", type=float, default=60.0,
                        help="fault round: seconds of load; the busiest worker dies at 1/4, restarts at 1/2")
    parser.add_argument("--fault-max-tokens", type=int, default=32, help="fault round: tokens per streamed answer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", default="results/routing.json", help="where the JSON report is written")
    args = parser.parse_args()
    report = {}
    if args.only in (None, "routing"):
        report["routing"] = routing(args)
    if args.only in (None, "overhead"):
        report["overhead"] = overhead(args)
    if args.only in (None, "fault"):
        report["fault"] = fault(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "routing" in report:
        r = report["routing"]
        print(f"\nmulti-tenant workload: {args.tenants} tenants x {args.system_words}-word system prompts, "
              f"{args.requests} requests, concurrency {args.concurrency}, 2 aggregated {args.engine} workers")
        print(f"{'policy':<12} {'hit rate':>8} {'TTFT p50':>10} {'TTFT p90':>10} {'req/s':>7} {'tok/s':>7} {'errors':>6}")
        for policy in ("prefix", "round_robin"):
            p = r[policy]
            print(f"{policy:<12} {p['hit_rate']:>8.3f} {p['ttft_p50_ms']:>8.1f}ms {p['ttft_p90_ms']:>8.1f}ms "
                  f"{p['req_per_s']:>7.2f} {p['tokens_per_s']:>7.1f} {p['errors']:>6}")
        print(f"TTFT p90 round-robin / prefix-aware: {r['ttft_p90_speedup']:.2f}x")
    if "overhead" in report:
        o = report["overhead"]
        print(f"\nrouter overhead: {args.overhead_clients} concurrent streaming clients, instant upstream, "
              f"{args.overhead_rounds} alternating rounds")
        print(f"{'round':<6} {'direct p50':>10} {'direct p99':>10} {'router p50':>10} {'router p99':>10} "
              f"{'added p50':>9} {'added p99':>9} {'req/s':>6} {'errors':>6} {'CPU ms/req':>10}")
        for i, r in enumerate(o["rounds"], 1):
            print(f"{i:<6} {r['direct']['ttfb_p50_ms']:8.2f}ms {r['direct']['ttfb_p99_ms']:8.2f}ms "
                  f"{r['router']['ttfb_p50_ms']:8.2f}ms {r['router']['ttfb_p99_ms']:8.2f}ms "
                  f"{r['added_p50_ms']:7.2f}ms {r['added_p99_ms']:7.2f}ms {r['router']['rps']:6.1f} "
                  f"{r['direct']['errors'] + r['router']['errors']:6d} {r['router_cpu_ms_per_request']:10.2f}")
        print(f"added by the router (median of rounds): p50 {o['added_p50_ms']:.2f}ms  p99 {o['added_p99_ms']:.2f}ms  "
              f"(router CPU {o['router_cpu_ms_per_request']:.2f} ms per request); errors: direct "
              f"{o['direct']['errors']}, router {o['router']['errors']} of {o['router']['requests']}")
    if "fault" in report:
        f = report["fault"]
        print(f"\nfault round: {f['concurrency']} streaming users x {f['max_tokens']} tokens; "
              f"busiest worker SIGKILLed at {f['events'].get('killed_at', 0):.1f} s, restarted at "
              f"{f['events'].get('restarted_at', 0):.1f} s, healthy at {f['events'].get('healthy_at', 0):.1f} s")
        print(f"{'phase':<8} {'requests':>8} {'lost':>5} {'tok/s':>7} {'TTFT p50':>10} {'TTFT p90':>10}")
        for phase in ("before", "outage", "after"):
            p = f[phase]
            p50 = f"{p['ttft_p50_ms']:8.1f}ms" if p["ttft_p50_ms"] is not None else "       n/a"
            p90 = f"{p['ttft_p90_ms']:8.1f}ms" if p["ttft_p90_ms"] is not None else "       n/a"
            print(f"{phase:<8} {p['requests']:>8} {p['lost']:>5} {p['tokens_per_s']:>7.1f} {p50} {p90}")
        print(f"requests lost: {f['lost']} of {f['requests']} (goal 0); streams migrated: {f['migrations']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
