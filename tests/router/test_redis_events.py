"""The Redis KV-event consumer against a real redis-server, with entries XADDed in the documented format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import httpx
import redis.asyncio as aioredis

from tandem.router.events import RedisEventConsumer, stream_key
from tandem.router.index import PrefixIndex

from .peers import PeerWorker
from .test_proxy import SYSTEM_A, SYSTEM_B, metric, peers, running_router, wait_for

W1 = "http://127.0.0.1:1001"
W2 = "http://127.0.0.1:1002"


async def xadd(redis_url: str, message: dict, entry_id: str = "*") -> None:
    """Publish like a worker does: field ``data`` = the JSON line, approximate MAXLEN 100000."""
    client = aioredis.from_url(redis_url)
    try:
        await client.xadd(stream_key(message["model"]), {"data": json.dumps(message)}, id=entry_id,
                          maxlen=100000, approximate=True)
    finally:
        await client.aclose()


def snapshot(worker: str, hashes: list[int], seq: int = 0) -> dict:
    return {"kind": "snapshot", "worker": worker, "model": "m", "seq": seq, "block_size": 16, "block_hashes": hashes}


def batch(worker: str, seq: int, stored: list[int]) -> dict:
    return {"kind": "batch", "worker": worker, "model": "m", "seq": seq, "ts": time.time(), "events": [
        {"type": "BlockStored", "block_hashes": stored, "parent_block_hash": None, "token_ids": [], "block_size": 16}]}


@contextlib.asynccontextmanager
async def consuming(redis_url: str, ttl_s: float = 10.0):
    index = PrefixIndex(ttl_s)
    states: list[bool] = []
    consumer = RedisEventConsumer(redis_url, "m", index, states.append, block_ms=100, max_backoff_s=0.2)
    task = asyncio.create_task(consumer.run())
    try:
        yield index, consumer, states
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_consumer_builds_index_and_a_late_replica_catches_up(redis_server):
    await xadd(redis_server.url, snapshot(W1, [1, 2]))
    async with consuming(redis_server.url) as (index, consumer, states):
        await wait_for(lambda: index.num_blocks(W1) == 2)
        await xadd(redis_server.url, batch(W1, 1, [3]))
        await xadd(redis_server.url, snapshot(W2, [9]))
        await xadd(redis_server.url, {"kind": "heartbeat", "worker": W1, "model": "m", "seq": 1, "ts": time.time()})
        await wait_for(lambda: index.matched_blocks([1, 2, 3], W1) == 3 and index.owners(9) == {W2})
        assert states[-1] is True and consumer.connected
        # A replica started later reads the stream from 0 and ends up with the same index.
        async with consuming(redis_server.url) as (late, _, _):
            await wait_for(lambda: late.matched_blocks([1, 2, 3], W1) == 3 and late.owners(9) == {W2})
    # Other models' streams are not mixed in.
    await xadd(redis_server.url, {**snapshot(W1, [77]), "model": "other"})
    async with consuming(redis_server.url) as (index, consumer, _):
        await wait_for(lambda: consumer.entries_read == 4)
        assert index.owners(77) == frozenset()


async def test_catch_up_expires_workers_silent_for_longer_than_the_ttl(redis_server):
    old_ms = int((time.time() - 60) * 1000)
    await xadd(redis_server.url, snapshot(W1, [1]), entry_id=f"{old_ms}-0")  # a worker gone a minute ago
    await xadd(redis_server.url, snapshot(W2, [2]))
    async with consuming(redis_server.url, ttl_s=10) as (index, consumer, _):
        await wait_for(lambda: consumer.entries_read == 2)
        await wait_for(lambda: index.owners(1) == frozenset())
        assert index.owners(2) == {W2}


async def test_redis_down_clears_index_and_recovers(redis_server):
    await xadd(redis_server.url, snapshot(W1, [1, 2]))
    async with consuming(redis_server.url) as (index, consumer, states):
        await wait_for(lambda: index.num_blocks(W1) == 2)
        redis_server.stop()
        await wait_for(lambda: not consumer.connected)
        assert states[-1] is False
        assert index.num_blocks() == 0  # stale entries must not steer traffic while blind
        redis_server.start()  # empty again (no persistence): workers republish snapshots on reconnect
        await wait_for(lambda: consumer.connected, timeout=10)
        await xadd(redis_server.url, snapshot(W1, [5]))
        await wait_for(lambda: index.owners(5) == {W1})


async def test_router_replicas_share_the_redis_index_and_degrade_without_it(redis_server, tokenizer_path, make_client,
                                                                           caplog):
    a, b = PeerWorker("A"), PeerWorker("B")
    caplog.set_level(logging.WARNING, logger="tandem.router")
    async with peers(a, b), running_router(tokenizer_path, worker_urls=(a.url, b.url), redis_url=redis_server.url,
                                                   kv_event_ttl_s=60) as (service, url):
        def hashes(system: str) -> list[int]:
            return service.routing_request("/v1/chat/completions", {"model": "m", "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": "x"}]}).block_hashes

        # The workers publish to Redis (not over the direct channel: the router must not read it).
        await xadd(redis_server.url, {**a.snapshot(), "block_hashes": hashes(SYSTEM_A)[:-1]})
        await xadd(redis_server.url, {**b.snapshot(), "block_hashes": hashes(SYSTEM_B)[:-1]})
        await wait_for(lambda: service.index.num_blocks(a.url) and service.index.num_blocks(b.url))

        async def answers(router_url: str) -> list[str]:
            api = make_client(router_url)
            out = []
            for i in range(4):
                for system in (SYSTEM_A, SYSTEM_B):
                    reply = await api.chat.completions.create(model="m", messages=[
                        {"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}])
                    out.append(reply.choices[0].message.content)
            return out

        assert await answers(url) == ["A", "B"] * 4
        async with running_router(tokenizer_path, worker_urls=(a.url, b.url), redis_url=redis_server.url,
                                  kv_event_ttl_s=60) as (late, url2):
            await wait_for(lambda: late.index.num_blocks(a.url) and late.index.num_blocks(b.url))
            assert await answers(url2) == ["A", "B"] * 4

        async with httpx.AsyncClient() as http:
            assert metric((await http.get(url + "/metrics")).text, "tandem:router_redis_index_connected") == 1
            redis_server.stop()
            await wait_for(lambda: not service.redis_consumer.connected)
            assert metric((await http.get(url + "/metrics")).text, "tandem:router_redis_index_connected") == 0
            assert any("routing by load only" in r.getMessage() for r in caplog.records)
            # Load-only routing still serves every request.
            results = await answers(url)
            assert len(results) == 8 and set(results) <= {"A", "B"}
            assert service.index.num_blocks() == 0
            redis_server.start()
            await wait_for(lambda: service.redis_consumer.connected, timeout=10)
            assert metric((await http.get(url + "/metrics")).text, "tandem:router_redis_index_connected") == 1
            await xadd(redis_server.url, {**a.snapshot(), "block_hashes": hashes(SYSTEM_A)[:-1]})
            await xadd(redis_server.url, {**b.snapshot(), "block_hashes": hashes(SYSTEM_B)[:-1]})
            await wait_for(lambda: service.index.num_blocks(a.url) and service.index.num_blocks(b.url))
            assert await answers(url) == ["A", "B"] * 4
