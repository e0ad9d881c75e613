"""End to end with real processes: `tandem serve` workers, `tandem router` replicas, a real redis-server.

Slow (each engine loads the real model), so processes are module-scoped and shared by the tests, which run in
file order; the destructive one (killing a worker) comes last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import RedisServer
from .peers import free_port

pytestmark = pytest.mark.slow

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TANDEM = [sys.executable, "-m", "tandem.cli"]
TENANTS = [
    "You are the billing assistant of ACME Corp. Answer briefly and politely about invoices, refunds and plans. " * 3,
    "You are a weather bot for Paris. Always mention the temperature in Celsius and suggest what to wear. " * 3,
    "You are a chess coach. Explain openings, tactics and endgames to beginners with short concrete examples. " * 3,
    "You are a travel agent for Japan. Recommend trains, temples and food, and warn about public holidays. " * 3,
]


class Proc:
    """A `tandem` child in its own process group, logging to a file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        self.env = {**os.environ, "TANDEM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.env.pop("TANDEM_API_KEY", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proc":
        self.proc = subprocess.Popen([*TANDEM, *self.args], env=self.env, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_healthy(self, url: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.args[0]} exited: {self.log.read_text()[-2000:]}"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} not healthy in {timeout_s}s")

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.send_signal(sig)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM everything at once (engines drain in parallel), then wait, killing stragglers."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.kill(signal.SIGTERM)


def engine_counters(url: str) -> tuple[float, float]:
    """(prefix-cache hits, queries) as the engine itself counts them."""
    hits = queries = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def router_metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """Redis, two aggregated workers publishing KV events (direct and Redis), and a direct-channel router."""
    tmp = tmp_path_factory.mktemp("e2e")
    redis = RedisServer(tmp)
    redis.start()
    procs: list[Proc] = []
    workers = []
    try:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url, "--model", MODEL,
                         "--kv-cache-memory", "256MB", "--kv-events-redis", redis.url], tmp / f"worker{i}.log").start()
            procs.append(proc)
            workers.append((url, proc))
        for url, proc in workers:
            proc.wait_healthy(url)
        router_port = free_port()
        router_url = f"http://127.0.0.1:{router_port}"
        router = Proc(["router", "--port", str(router_port), "--model", MODEL, "--kv-event-ttl", "5",
                       "--health-interval", "0.5", *sum((["--worker", u] for u, _ in workers), [])],
                      tmp / "router.log").start()
        procs.append(router)
        router.wait_healthy(router_url, 60)
        yield {"tmp": tmp, "redis": redis, "workers": workers, "router_url": router_url, "procs": procs}
    finally:
        stop_all(procs)
        redis.stop()


def ask(base_url: str, system: str, question: str, max_tokens: int = 8, stream: bool = False) -> str:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        if not stream:
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
            return reply.choices[0].message.content
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_router_gives_the_same_greedy_outputs_as_serve(platform):
    direct_url = platform["workers"][0][0]
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        with openai.OpenAI(base_url=direct_url + "/v1", api_key="none") as direct, \
                openai.OpenAI(base_url=platform["router_url"] + "/v1", api_key="none") as routed:
            expected = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
            got = routed.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
            streamed = "".join(c.choices[0].text for c in routed.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert got == expected == streamed
    # NOTE: a chat prompt with a system prompt fills whole KV blocks: a worker that has it cached prefills only the
    # tail, through another attention kernel, and in bf16 a near tie can then pick another token. Warm both workers
    # first, so that the routed and the direct request take the same path and only the router can differ.
    for url, _ in platform["workers"]:
        ask(url, TENANTS[0], "Hi")
    assert ask(platform["router_url"], TENANTS[0], "Hi", stream=True) == ask(direct_url, TENANTS[0], "Hi")


def tenant_round(router_url: str, workers: list[tuple[str, Proc]], question: str) -> list[int]:
    """One question per tenant, sequentially; returns, per request, how many prompt tokens an engine served from
    its prefix cache (from the engines' own counters)."""
    hits_per_request = []
    for system in TENANTS:
        before = [engine_counters(u)[0] for u, _ in workers]
        ask(router_url, system, question, max_tokens=2)
        after = [engine_counters(u)[0] for u, _ in workers]
        hits_per_request.append(int(sum(a - b for a, b in zip(after, before))))
    return hits_per_request


def test_each_tenant_goes_to_the_worker_holding_its_prefix(platform):
    router_url, workers = platform["router_url"], platform["workers"]
    tenant_round(router_url, workers, "Warm up.")  # the first request of each tenant fills some worker's cache
    time.sleep(0.5)  # KV events reach the router
    # Every later request lands where its ~80-token system prompt is cached: >= 4 full blocks hit each time.
    for question in ("What can you do?", "Give me one tip.", "Thanks!"):
        hits = tenant_round(router_url, workers, question)
        assert all(h >= 64 for h in hits), hits
    # Both workers were used (load spreads tenants), and each tenant stuck to one.
    blocks = [router_metric(router_url, "tandem:router_requests_total", worker=u, outcome="ok") for u, _ in workers]
    assert all(b > 0 for b in blocks), blocks


def test_a_second_router_replica_with_redis_routes_the_same_way(platform):
    tmp, redis, workers = platform["tmp"], platform["redis"], platform["workers"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    late = Proc(["router", "--port", str(port), "--model", MODEL, "--redis-url", redis.url, "--kv-event-ttl", "5",
                 "--health-interval", "0.5", *sum((["--worker", u] for u, _ in workers), [])], tmp / "router2.log").start()
    platform["procs"].append(late)
    late.wait_healthy(url, 60)
    deadline = time.monotonic() + 10
    while router_metric(url, "tandem:router_index_blocks") < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    # Caught up from the stream: it never saw a request, yet routes each tenant to its cache.
    hits = tenant_round(url, workers, "And another question?")
    assert all(h >= 64 for h in hits), hits
    assert router_metric(url, "tandem:router_redis_index_connected") == 1

    # Redis goes away: load-only routing, said by the gauge and the log; requests still succeed.
    blocks_before = router_metric(url, "tandem:router_index_blocks")
    redis.stop()
    deadline = time.monotonic() + 10
    while router_metric(url, "tandem:router_redis_index_connected") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "routing by load only" in (tmp / "router2.log").read_text()
    assert router_metric(url, "tandem:router_index_blocks") == 0
    assert len(ask(url, TENANTS[0], "Still there?", max_tokens=2)) > 0
    # Redis returns: the workers republish snapshots, the replica reconnects and routes by prefix again.
    redis.start()
    deadline = time.monotonic() + 20
    # Every worker's snapshot is back (one worker's alone could pass a smaller bar).
    while (router_metric(url, "tandem:router_redis_index_connected") != 1
           or router_metric(url, "tandem:router_index_blocks") < blocks_before):
        assert time.monotonic() < deadline, "router did not recover its Redis index"
        time.sleep(0.3)
    hits = tenant_round(url, workers, "Back again?")
    assert all(h >= 64 for h in hits), hits
    late.kill(signal.SIGTERM)


def test_killing_a_worker_under_load_loses_no_request(platform):
    router_url, workers = platform["router_url"], platform["workers"]
    (victim_url, victim), (survivor_url, _) = workers
    requests_before = router_metric(router_url, "tandem:router_requests_total")

    def one(i: int) -> str:
        return ask(router_url, TENANTS[i % len(TENANTS)], f"Question number {i}?", max_tokens=16, stream=i % 2 == 0)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        victim.kill(signal.SIGKILL)
        outcomes = []
        for future in futures:
            try:
                outcomes.append(("ok", future.result(timeout=120)))
            except openai.APIError as exc:  # a stream cut mid-way ends with an error event, never a hang
                outcomes.append(("error", str(exc)))
    assert len(outcomes) == 24  # every request ended
    # None lost: streams cut mid-way resume on the survivor, unfinished non-streamed requests are retried there.
    assert [text for kind, text in outcomes if kind == "error"] == []
    assert all(text for _, text in outcomes)
    # Each one is counted by the router.
    assert router_metric(router_url, "tandem:router_requests_total") - requests_before == 24
    # Later requests avoid the dead worker: all succeed, none retried.
    retries = router_metric(router_url, "tandem:router_retries_total")
    for i in range(4):
        assert ask(router_url, TENANTS[i], "After the crash?", max_tokens=2)
    assert router_metric(router_url, "tandem:router_retries_total") == retries
    # The worker comes back on the same port: health checks readmit it and it serves again.
    port = victim_url.rsplit(":", 1)[1]
    victim.start()
    victim.wait_healthy(victim_url)
    deadline = time.monotonic() + 30
    served_before = router_metric(router_url, "tandem:router_requests_total", worker=victim_url)
    while router_metric(router_url, "tandem:router_requests_total", worker=victim_url) == served_before:
        assert time.monotonic() < deadline, f"restarted worker on port {port} got no traffic"
        # Prompts sharing no prefix with anything cached, so only load decides (the survivor is no better).
        ask(router_url, f"{time.monotonic_ns()} is your id.", "Hi", max_tokens=2)
    assert survivor_url != victim_url
