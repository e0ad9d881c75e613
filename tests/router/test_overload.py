"""Overload: when every eligible worker's queue is at the bound, the router answers 429 + Retry-After at once."""

from __future__ import annotations

import asyncio
import time

import httpx

from tandem.router.app import build_app
from tandem.router.config import RouterConfig

from .peers import PeerWorker, free_port, serve_app, stop_app


async def test_every_worker_at_its_queue_bound_gets_429_with_retry_after_at_once():
    slow = PeerWorker("slow", delay_s=1.5)
    await slow.start()
    config = RouterConfig(served_model_name="m", worker_urls=(slow.url,), health_interval_s=0.2, max_queue_per_worker=2)
    app = build_app(config, None)
    port = free_port()
    server, task = await serve_app(app, port)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    try:
        await asyncio.wait_for(app.state.service.health.checked.wait(), 10)
        async with httpx.AsyncClient(timeout=10) as client:
            held = [asyncio.create_task(client.post(url + "/v1/completions", json=body)) for _ in range(2)]
            while len(slow.requests) < 2:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            refused = await client.post(url + "/v1/completions", json=body)
            assert time.monotonic() - started < 0.5  # answered at once, not queued behind the slow requests
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            assert len(slow.requests) == 2  # never sent on
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.post(url + "/v1/completions", json=body)).status_code == 200  # room again
            metrics = (await client.get(url + "/metrics")).text
            assert 'outcome="overloaded",pool="none",worker="none"} 1.0' in metrics
    finally:
        await stop_app(server, task)
        await slow.stop()
