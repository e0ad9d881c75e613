"""Outlier ejection with a real worker process that fails on purpose, next to a good peer.

The failing worker is a small HTTP server in its own process: /health, /v1/models and /metrics answer 200
(so active health checks alone never catch it), and what completions get is read from a file per request:
``500`` (an error answer), ``drop`` (the connection is closed without an answer) or ``ok``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tandem.router.app import build_app
from tandem.router.config import RouterConfig

from .peers import PeerWorker, free_port, serve_app, stop_app

FAILING_WORKER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
        else:
            self.reply(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        mode = open(MODE).read().strip()
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if mode == "500":
            self.reply(500, {"error": {"message": "broken on purpose", "type": "server_error", "param": None,
                                       "code": None}})
            return
        self.reply(200, {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "text": "flaky", "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@contextlib.contextmanager
def failing_worker(tmp_path: Path, mode: str):
    port = free_port()
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    proc = subprocess.Popen([sys.executable, "-c", FAILING_WORKER, str(port), str(mode_file)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the failing worker did not start"
                time.sleep(0.05)
        yield url, mode_file
    finally:
        proc.kill()
        proc.wait(10)


async def complete(client: httpx.AsyncClient, url: str) -> str:
    reply = await client.post(url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
    assert reply.status_code == 200, reply.text  # a failed attempt is retried on the good worker
    return reply.json()["choices"][0]["text"]


async def stream(client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("POST", url + "/v1/completions",
                             json={"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True}) as reply:
        assert reply.status_code == 200
        assert (await reply.aread()).endswith(b"data: [DONE]\n\n")


async def ejected_for(worker, client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """Send requests until ``worker`` gets ejected; then (how long the router still keeps it out when we see it
    ejected, how long it stayed ejected by the wall clock). The first has a tight upper bound on any host; the
    second only a lower one (a loaded host may see the readmission late)."""
    deadline = time.monotonic() + 20
    while worker.state != "ejected":
        assert time.monotonic() < deadline, f"not ejected (state {worker.state})"
        await complete(client, url)
    start = time.monotonic()
    remaining = worker.ejected_until - start
    while worker.state == "ejected":
        await asyncio.sleep(0.01)
    return remaining, time.monotonic() - start


@pytest.mark.slow  # starts the failing worker's process
@pytest.mark.parametrize("mode", ["500", "drop"])
async def test_a_failing_worker_is_ejected_for_growing_intervals_and_readmitted_after_a_trial(tmp_path, mode):
    good = PeerWorker("good")
    await good.start()
    with failing_worker(tmp_path, mode) as (bad_url, mode_file):
        config = RouterConfig(served_model_name="m", worker_urls=(good.url, bad_url), health_interval_s=0.1,
                              retry_backoff_s=0.0, outlier_base_ejection_s=0.4, outlier_max_ejection_s=1.0,
                              outlier_consecutive_5xx=2)
        app = build_app(config, None)
        port = free_port()
        server, task = await serve_app(app, port)
        url = f"http://127.0.0.1:{port}"
        service = app.state.service
        bad = service.datastore.workers[bad_url]
        try:
            await asyncio.wait_for(service.health.checked.wait(), 10)
            async with httpx.AsyncClient(timeout=10) as client:
                # base x 1, base x 2, then capped at max: every trial request fails, so each ejection is longer.
                durations = [await ejected_for(bad, client, url) for _ in range(3)]
                for (remaining, stayed), ejection in zip(durations, (0.4, 0.8, 1.0)):
                    assert ejection - 0.25 <= remaining <= ejection, durations  # what the router decided
                    assert stayed >= remaining - 0.02, durations  # and kept it out that long
                # Health checks pass all along: only the failed requests ejected it.
                assert bad.healthy or mode == "500"
                metrics = (await client.get(url + "/metrics")).text
                assert f'tandem:router_worker_ejections_total{{pool="aggregated",worker="{bad_url}"}} 3.0' in metrics
                # It recovers: the next trial request succeeds and readmits it, and it serves again.
                mode_file.write_text("ok")
                while bad.state == "ejected":
                    await asyncio.sleep(0.02)
                texts = [await complete(client, url) for _ in range(20)]
                assert "flaky" in texts and bad.state == "healthy", (texts, bad.state)
                metrics = (await client.get(url + "/metrics")).text
                assert (f'tandem:router_worker_state{{pool="aggregated",state="healthy",worker="{bad_url}"}} 1.0'
                        in metrics)
                assert f'tandem:router_worker_ejections_total{{pool="aggregated",worker="{bad_url}"}} 3.0' in metrics
        finally:
            await stop_app(server, task)
            await good.stop()


async def test_a_worker_far_slower_than_its_peers_is_down_weighted_not_ejected():
    fast, slow = PeerWorker("fast"), PeerWorker("slow", delay_s=0.3)
    for peer in (fast, slow):
        await peer.start()
    config = RouterConfig(served_model_name="m", worker_urls=(fast.url, slow.url), health_interval_s=0.2)
    app = build_app(config, None)
    port = free_port()
    server, task = await serve_app(app, port)
    url = f"http://127.0.0.1:{port}"
    service = app.state.service
    try:
        await asyncio.wait_for(service.health.checked.wait(), 10)
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(24):  # sequential: load is equal, only latency (of streams) tells them apart
                await stream(client, url)
            workers = service.datastore.workers
            assert workers[slow.url].weight < 0.5 and workers[fast.url].weight == 1.0
            assert workers[slow.url].state == "healthy"
            slow.requests.clear()
            fast.requests.clear()
            for _ in range(20):
                await stream(client, url)
            assert len(fast.requests) > len(slow.requests)
            metrics = (await client.get(url + "/metrics")).text
            assert f'tandem:router_worker_weight{{pool="aggregated",worker="{slow.url}"}}' in metrics
    finally:
        await stop_app(server, task)
        for peer in (fast, slow):
            await peer.stop()
