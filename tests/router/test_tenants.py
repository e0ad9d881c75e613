"""Tenants and their per-minute limits: two router replicas sharing a real Redis, then Redis gone (per replica),
and a tenants file changed under a running router."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tandem.router.app import build_app
from tandem.router.config import RouterConfig
from tandem.router.tenants import load_tenants
from tandem.router.tokenizer import PromptTokenizer

from .peers import PeerWorker, free_port, serve_app, stop_app

TENANTS = {"tenants": [
    {"name": "acme", "api_keys": ["sk-acme"], "requests_per_minute": 4},
    {"name": "tokenco", "api_keys": ["sk-tok"], "tokens_per_minute": 30},
    {"name": "free", "api_keys": ["sk-free"]},
]}


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, redis_url: str | None, tokenizer_path: Path, count: int = 2) -> AsyncIterator[list]:
    """``count`` router replicas over one peer worker, sharing a tenants file (and Redis when given)."""
    tenants = tmp_path / "tenants.json"
    if not tenants.exists():
        tenants.write_text(json.dumps(TENANTS))
    worker = PeerWorker("w")
    await worker.start()
    running = []
    try:
        for _ in range(count):
            config = RouterConfig(served_model_name="m", worker_urls=(worker.url,), health_interval_s=0.2,
                                  tenants_file=str(tenants), ratelimit_redis_url=redis_url)
            app = build_app(config, PromptTokenizer(tokenizer_path))
            port = free_port()
            server, task = await serve_app(app, port)
            running.append((server, task))
            await asyncio.wait_for(app.state.service.health.checked.wait(), 10)
            running[-1] = (server, task, f"http://127.0.0.1:{port}", app.state.service)
        yield [(url, service) for _, _, url, service in running]
    finally:
        for server, task, *_ in running:
            await stop_app(server, task)
        await worker.stop()


async def ask(client: httpx.AsyncClient, url: str, key: str, prompt: str = "hi") -> httpx.Response:
    return await client.post(url + "/v1/completions", headers={"authorization": f"Bearer {key}"},
                             json={"model": "m", "prompt": prompt, "max_tokens": 1})


async def test_request_limits_hold_across_two_replicas_sharing_redis(tmp_path, redis_server, tokenizer_path):
    async with replicas(tmp_path, redis_server.url, tokenizer_path) as [(a, service_a), (b, service_b)], \
            httpx.AsyncClient(timeout=10) as client:
        statuses = [(await ask(client, url, "sk-acme")).status_code for url in (a, b, a, b)]
        assert statuses == [200, 200, 200, 200]
        refused = await ask(client, b, "sk-acme")  # the fifth in the minute, whichever replica gets it
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-limit-requests"] == "4"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert "acme" not in refused.text  # the tenant is named in logs, not in responses
        assert (await ask(client, a, "sk-acme")).status_code == 429
        # Other tenants are not affected; an unknown key is refused.
        assert [(await ask(client, url, "sk-free")).status_code for url in (a, b) * 3] == [200] * 6
        assert (await ask(client, a, "sk-nobody")).status_code == 401
        assert service_a.metrics.ratelimit_shared._value.get() == 1
        assert service_b.metrics.ratelimit_shared._value.get() == 1
        metrics = (await client.get(a + "/metrics")).text
        assert 'tandem:tenant_requests_total{outcome="admitted",tenant="acme"}' in metrics


async def test_token_limits_count_prompt_and_completion_tokens_across_replicas(tmp_path, redis_server, tokenizer_path):
    prompt = "Tell me about the weather in Paris today."
    prompt_tokens = len(PromptTokenizer(tokenizer_path).encode_prompt(prompt))
    async with replicas(tmp_path, redis_server.url, tokenizer_path) as [(a, service_a), (b, service_b)], \
            httpx.AsyncClient(timeout=10) as client:
        used, statuses = 0, []
        for url, service in ((a, service_a), (b, service_b), (a, service_a), (b, service_b), (a, service_a)):
            reply = await ask(client, url, "sk-tok", prompt)
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                used += prompt_tokens + 1  # the peer's answer counts one completion token
            # The completion is charged to Redis after the answer, in the background: let it land (a fixed 50 ms
            # was not always enough on a loaded CI host).
            await asyncio.wait_for(asyncio.gather(*list(service._background)), 10)
        # Admitted while the minute's count is below 30 tokens, whichever replica counted them.
        expected, count = [], 0
        for _ in range(5):
            expected.append(200 if count < 30 else 429)
            count += prompt_tokens + 1 if count < 30 else 0
        assert statuses == expected, (statuses, prompt_tokens)
        refused = await ask(client, b, "sk-tok", prompt)
        assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-tokens"] == "30"
        metrics = (await client.get(b + "/metrics")).text
        assert 'tandem:tenant_tokens_total{tenant="tokenco"}' in metrics


async def test_without_redis_each_replica_enforces_the_limits_on_its_own(tmp_path, redis_server, tokenizer_path):
    redis_server.stop()
    async with replicas(tmp_path, redis_server.url, tokenizer_path) as [(a, service_a), (b, service_b)], \
            httpx.AsyncClient(timeout=10) as client:
        for url in (a, b):
            statuses = [(await ask(client, url, "sk-acme")).status_code for _ in range(5)]
            assert statuses == [200, 200, 200, 200, 429], url
        assert service_a.metrics.ratelimit_shared._value.get() == 0
        assert service_b.metrics.ratelimit_shared._value.get() == 0
        # Redis comes back: the replicas share their counts again.
        redis_server.start()
        deadline = time.monotonic() + 10
        while service_a.metrics.ratelimit_shared._value.get() == 0:
            assert time.monotonic() < deadline, "rate limits did not go back to Redis"
            await ask(client, a, "sk-acme")  # a limited tenant: its check tries Redis again (every 2 s at most)
            await asyncio.sleep(0.5)
        # Redis's (fresh) count applies: four more requests of the minute, then 429 on either replica.
        statuses = [(await ask(client, url, "sk-acme")).status_code for url in (a, b, a, b, a)]
        assert statuses[-1] == 429 and statuses.count(200) <= 4, statuses


async def test_a_changed_tenants_file_applies_without_restart(tmp_path, redis_server, tokenizer_path):
    async with replicas(tmp_path, redis_server.url, tokenizer_path, count=1) as [(a, service)], \
            httpx.AsyncClient(timeout=10) as client:
        assert (await ask(client, a, "sk-new")).status_code == 401
        changed = {"tenants": [*TENANTS["tenants"], {"name": "newco", "api_keys": ["sk-new"], "requests_per_minute": 1}]}
        (tmp_path / "tenants.json").write_text(json.dumps(changed))
        deadline = time.monotonic() + 10
        while (await ask(client, a, "sk-new")).status_code == 401:
            assert time.monotonic() < deadline, "the new tenant was not picked up"
            await asyncio.sleep(0.2)
        assert (await ask(client, a, "sk-new")).status_code == 429  # its limit of 1 per minute applies too
        # A broken file keeps the previous table.
        (tmp_path / "tenants.json").write_text("{not: [valid")
        await asyncio.sleep(1.5)
        assert (await ask(client, a, "sk-free")).status_code == 200


@pytest.mark.parametrize("document,field", [
    ({"tenants": [{"name": "x", "api_keys": []}]}, "tenants[0].api_keys"),
    ({"tenants": [{"name": "x", "api_keys": ["k"], "requests_per_minute": 0}]}, "tenants[0].requests_per_minute"),
    ({"tenants": [{"name": "x", "api_keys": ["k"]}, {"name": "x", "api_keys": ["j"]}]}, "tenants[1].name"),
    ({"tenants": [{"name": "x", "api_keys": ["k"], "rpm": 3}]}, "tenants[0].rpm"),
    ({"tenant": []}, "tenants"),
])
def test_a_bad_tenants_file_names_the_field(tmp_path, document, field):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError) as error:
        load_tenants(path)
    assert str(error.value).startswith(field)
