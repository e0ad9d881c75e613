"""The router over real HTTP: OpenAI API through the official client, P/D orchestration, retries, errors, events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from tandem.router.app import build_app
from tandem.router.config import RouterConfig
from tandem.router.tokenizer import PromptTokenizer

from .peers import PeerWorker, free_port, serve_app, stop_app

SYSTEM_A = "You are the billing assistant of ACME. " * 12
SYSTEM_B = "You answer questions about the weather in Paris. " * 12


@contextlib.asynccontextmanager
async def running_router(tokenizer_path, **config_kw) -> AsyncIterator:
    """Start the router app on a free port and wait until its first health round is done."""
    config_kw.setdefault("health_interval_s", 0.2)
    config_kw.setdefault("retry_backoff_s", 0.01)
    config = RouterConfig(served_model_name="m", **config_kw)
    app = build_app(config, PromptTokenizer(tokenizer_path))
    port = free_port()
    server, task = await serve_app(app, port)
    service = app.state.service
    try:
        await asyncio.wait_for(service.health.checked.wait(), 10)
        yield service, f"http://127.0.0.1:{port}"
    finally:
        await stop_app(server, task)


@contextlib.asynccontextmanager
async def peers(*workers: PeerWorker) -> AsyncIterator[None]:
    for w in workers:
        await w.start()
    try:
        yield
    finally:
        for w in workers:
            await w.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_completions_and_chat_stream_and_not(tokenizer_path, make_client):
    worker = PeerWorker("w1")
    async with peers(worker), running_router(tokenizer_path, worker_urls=(worker.url,)) as (service, url):
        api = make_client(url)
        completion = await api.completions.create(model="m", prompt="Hello", max_tokens=4)
        assert completion.choices[0].text == "w1"
        chat = await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "w1"
        stream = await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "w10 w11 w12 w13 "
        stream = await api.completions.create(model="m", prompt="Hello", stream=True)
        assert "".join([c.choices[0].text async for c in stream]) == "w10 w11 w12 w13 "
        models = await api.models.list()
        assert [m.id for m in models.data] == ["m"]
        async with httpx.AsyncClient() as http:
            reply = await http.post(url + "/v1/completions", json={"model": "m", "prompt": "x"},
                                    headers={"X-Request-Id": "req-42"})
            assert reply.headers["x-request-id"] == "req-42"
            assert worker.request_ids[-1] == "req-42"  # the worker saw it too
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_requests_total", pool="aggregated", outcome="ok") == 5
        assert metric(metrics, "tandem:router_decisions_total", decision="aggregated") == 5
        assert metric(metrics, "tandem:router_routing_decision_seconds_count") == 5
        assert "process_cpu_seconds_total" in metrics and "python_gc_collections_total" in metrics
        assert worker.requests[0][1]["prompt"] == "Hello"
        assert service.datastore.workers[worker.url].inflight == 0


async def test_api_key_and_error_shapes(tokenizer_path, make_client):
    worker = PeerWorker("w1")
    async with peers(worker), running_router(tokenizer_path, worker_urls=(worker.url,), api_keys=("k1", "k2")) as (_, url):
        with pytest.raises(openai.AuthenticationError) as err:
            await make_client(url, api_key="wrong").completions.create(model="m", prompt="x")
        assert err.value.body["code"] == "invalid_api_key"
        assert (await make_client(url, api_key="k2").completions.create(model="m", prompt="x")).choices[0].text == "w1"
        api = make_client(url, api_key="k1")
        with pytest.raises(openai.NotFoundError) as err:
            await api.completions.create(model="nope", prompt="x")
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as err:
            await api.chat.completions.create(model="m", messages=[])
        assert err.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as err:  # the worker's own 400 is passed through
            await api.completions.create(model="m", prompt="x", max_tokens=-1)
        assert err.value.body["param"] == "max_tokens"
        async with httpx.AsyncClient() as http:
            auth = {"Authorization": "Bearer k1"}
            for reply, status in [
                (await http.post(url + "/v1/completions", content=b"{not json", headers=auth), 400),
                (await http.post(url + "/v1/completions", json=[1, 2], headers=auth), 400),
                (await http.post(url + "/v1/completions", json={"model": "m", "prompt": {"x": 1}}, headers=auth), 400),
                (await http.post(url + "/v1/completions", json={"model": "m", "prompt": "x", "stream": "yes"}, headers=auth), 400),
                (await http.get(url + "/v1/nothing-here", headers=auth), 404),
                (await http.get(url + "/v1/chat/completions", headers=auth), 405),
                (await http.get(url + "/v1/models"), 401),
            ]:
                assert reply.status_code == status
                assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
            assert (await http.get(url + "/health")).status_code == 200
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_requests_total", outcome="unauthorized") == 1
        assert metric(metrics, "tandem:router_requests_total", outcome="rejected") == 6


async def test_dead_worker_is_retried_avoided_and_readmitted(tokenizer_path, make_client):
    good, dead = PeerWorker("good"), PeerWorker("dead")
    async with peers(good, dead), running_router(tokenizer_path, worker_urls=(good.url, dead.url),
                                                  health_interval_s=60, outlier_base_ejection_s=0.3) as (service, url):
        # Active checks are run by hand below (interval 60 s), so only failed requests can reveal the death.
        await dead.stop()  # killed after it was seen healthy: the router learns it from failed requests
        api = make_client(url)
        results = await asyncio.gather(*(api.completions.create(model="m", prompt=f"q{i}") for i in range(20)))
        assert all(r.choices[0].text == "good" for r in results)
        assert not service.datastore.workers[dead.url].healthy
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_requests_total", outcome="ok") == 20
        # Later requests avoid it: every one lands on the good worker without a retry.
        retries = metric(metrics, "tandem:router_retries_total")
        assert retries >= 1
        good.requests.clear()
        for i in range(5):
            await api.completions.create(model="m", prompt=f"later{i}")
        async with httpx.AsyncClient() as http:
            assert metric((await http.get(url + "/metrics")).text, "tandem:router_retries_total") == retries
        # Back on the same port: the active health check readmits it.
        await service.health.check_all()
        assert not service.datastore.workers[dead.url].healthy
        await dead.start()
        await service.health.check_all()
        assert service.datastore.workers[dead.url].healthy
        # Its outlier ejection runs out (0.3 s here): then a trial request readmits it.
        await wait_for(lambda: service.datastore.workers[dead.url].state == "trial")
        await asyncio.gather(*(api.completions.create(model="m", prompt=f"again{i}") for i in range(20)))
        assert service.datastore.workers[dead.url].state == "healthy"
        assert dead.requests, "a recovered worker gets traffic again"


async def test_failure_before_first_byte_is_retried_on_another_worker(tokenizer_path, make_client):
    flaky, good = PeerWorker("flaky", mode="drop_first"), PeerWorker("good")
    async with peers(flaky, good), running_router(tokenizer_path, worker_urls=(flaky.url, good.url)) as (_, url):
        api = make_client(url)
        for i in range(6):
            stream = await api.completions.create(model="m", prompt=f"p{i}", stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == "good0 good1 good2 good3 "


async def test_failure_mid_stream_ends_with_an_error_event(tokenizer_path, make_client):
    worker = PeerWorker("w", mode="die_mid")
    async with peers(worker), running_router(tokenizer_path, worker_urls=(worker.url,)) as (service, url):
        api = make_client(url)
        received = []
        with pytest.raises(openai.APIError) as err:
            stream = await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
            async with asyncio.timeout(10):
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
        assert received == ["w0 ", "w1 "]
        assert "mid-stream" in str(err.value)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_requests_total", outcome="stream_error") == 1
        assert service.datastore.workers[worker.url].inflight == 0


async def test_all_workers_down_gives_503(tokenizer_path, make_client):
    worker = PeerWorker("w")
    async with peers(worker), running_router(tokenizer_path, worker_urls=(worker.url,)) as (_, url):
        await worker.stop()
        with pytest.raises(openai.APIStatusError) as err:
            await make_client(url).completions.create(model="m", prompt="x")
        assert err.value.status_code == 503 and err.value.body["code"] == "no_healthy_worker"
        async with httpx.AsyncClient() as http:
            health = await http.get(url + "/health")
            assert health.status_code == 503
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_requests_total", outcome="unavailable") == 1


async def test_disaggregated_prefill_then_decode(tokenizer_path, make_client):
    prefill, decode = PeerWorker("P"), PeerWorker("D")
    async with peers(prefill, decode), running_router(tokenizer_path, prefill_urls=(prefill.url,),
                                                      decode_urls=(decode.url,), disagg_threshold=64,
                                                      health_interval_s=60) as (service, url):
        api = make_client(url)
        long_messages = [{"role": "system", "content": SYSTEM_A}, {"role": "user", "content": "What do I owe?"}]
        stream = await api.chat.completions.create(model="m", messages=long_messages, max_tokens=8, stream=True,
                                                   stream_options={"include_usage": True})
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "D0 D1 D2 D3 "
        (path, sent_to_prefill), = prefill.requests
        assert path == "/v1/chat/completions"
        assert sent_to_prefill["kv_transfer_params"] == {"do_remote_decode": True}
        assert sent_to_prefill["max_tokens"] == 1 and sent_to_prefill["stream"] is False and sent_to_prefill["n"] == 1
        assert "stream_options" not in sent_to_prefill
        _, sent_to_decode = decode.requests[0]
        assert sent_to_decode["kv_transfer_params"]["remote_engine_id"] == "P"
        assert sent_to_decode["max_tokens"] == 8 and sent_to_decode["stream"] is True
        assert sent_to_decode["messages"] == long_messages
        # A short prompt is not worth a prefill hop.
        await api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert len(prefill.requests) == 1 and "kv_transfer_params" not in decode.requests[1][1]
        # Prefill worker dies: the decode worker serves alone.
        await prefill.stop()
        reply = await api.chat.completions.create(model="m", messages=long_messages)
        assert reply.choices[0].message.content == "D"
        assert "kv_transfer_params" not in decode.requests[2][1]
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_decisions_total", decision="disaggregated") == 1
        assert metric(metrics, "tandem:router_decisions_total", decision="direct") == 1
        assert metric(metrics, "tandem:router_decisions_total", decision="prefill_fallback") == 1
        assert metric(metrics, "tandem:router_requests_total", pool="prefill", outcome="failed") == 1
        assert metric(metrics, "tandem:router_requests_total", pool="decode", outcome="ok") == 3


async def test_prefix_routing_follows_direct_kv_events_and_expires(tokenizer_path, make_client):
    a, b = PeerWorker("A"), PeerWorker("B")
    tokenizer = PromptTokenizer(tokenizer_path)
    async with peers(a, b), running_router(tokenizer_path, worker_urls=(a.url, b.url), kv_event_ttl_s=1.5) as (service, url):
        def hashes(system: str) -> list[int]:
            request = service.routing_request("/v1/chat/completions", {"model": "m", "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": "x"}]})
            return request.block_hashes
        assert len(tokenizer.encode_chat([{"role": "system", "content": SYSTEM_A}])) > 64
        await wait_for(lambda: service.index.is_synced(a.url) and service.index.is_synced(b.url))
        # The engines cached each tenant's system prompt (all blocks but the question's last one).
        a.store(hashes(SYSTEM_A)[:-1])
        b.store(hashes(SYSTEM_B)[:-1])
        await wait_for(lambda: service.index.num_blocks(a.url) and service.index.num_blocks(b.url))
        api = make_client(url)
        for i in range(6):
            for system, expected in ((SYSTEM_A, "A"), (SYSTEM_B, "B")):
                reply = await api.chat.completions.create(model="m", messages=[
                    {"role": "system", "content": system}, {"role": "user", "content": f"question {i}?"}])
                assert reply.choices[0].message.content == expected
        # B evicts its blocks: the index follows.
        b.remove(hashes(SYSTEM_B)[:-1])
        await wait_for(lambda: service.index.num_blocks(b.url) == 0)
        # A stops publishing (killed): after the TTL its entries are gone, not steering traffic.
        await a.stop()
        await wait_for(lambda: service.index.num_blocks(a.url) == 0, timeout=5)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert metric(metrics, "tandem:router_prefix_hit_ratio_count", pool="aggregated") == 12
        # Every request chose a worker holding all of its cached blocks (hit ratio > 0.75 bucket).
        assert metric(metrics, "tandem:router_prefix_hit_ratio_bucket", pool="aggregated", le="0.75") == 0


async def test_idle_keep_alive_connections_closed_by_the_worker_are_not_reused(tokenizer_path, make_client):
    worker = PeerWorker("w", keep_alive_s=0.3)
    async with peers(worker), running_router(tokenizer_path, worker_urls=(worker.url,), max_retries=0,
                                             health_interval_s=60) as (_, url):
        api = make_client(url)
        for _ in range(3):
            assert (await api.completions.create(model="m", prompt="x")).choices[0].text == "w"
            await asyncio.sleep(0.6)  # the worker has closed the pooled connection meanwhile
            stream = await api.completions.create(model="m", prompt="x", stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == "w0 w1 w2 w3 "
            await asyncio.sleep(0.6)
