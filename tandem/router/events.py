"""KV-event consumers that fold the engines' events into the prefix index.

Two channels carry the same messages (docs/interfaces.md):
- Redis: one stream per model, ``tandem:kv_events:<model>``, shared by every router replica; read from ``0``
  on start (catch-up), then blocking reads. If Redis goes away the index is cleared (routing degrades to
  load only, said by a gauge and a log line) and rebuilt by re-reading the stream once Redis is back.
- Direct: each worker's ``GET /kv_events/stream`` (ndjson: snapshot, then batches and heartbeats), used when
  there is no Redis (``tandem up``). A sequence gap closes the stream; reconnecting brings a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import httpx
import redis.asyncio as aioredis
import redis.exceptions

from tandem.router.index import PrefixIndex
from tandem.router.workers import Datastore

logger = logging.getLogger(__name__)


def stream_key(model: str) -> str:
    """The Redis stream carrying ``model``'s KV events."""
    return f"tandem:kv_events:{model}"


async def expire_loop(index: PrefixIndex, interval_s: float = 1.0) -> None:
    """Drop the entries of workers whose events stopped arriving (see ``PrefixIndex.expire``)."""
    while True:
        index.expire()
        await asyncio.sleep(interval_s)


class RedisEventConsumer:
    """Reads one model's KV-event stream from Redis into the index, reconnecting with backoff."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        index: PrefixIndex,
        on_connected: Callable[[bool], None],
        block_ms: int = 1000,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._redis_url = redis_url
        self._key = stream_key(model)
        self._index = index
        self._on_connected = on_connected
        self._block_ms = block_ms
        self._max_backoff_s = max_backoff_s
        self.connected = False
        self.entries_read = 0

    async def run(self) -> None:
        backoff = 0.1
        self._on_connected(False)
        while True:
            client = aioredis.from_url(self._redis_url, socket_connect_timeout=2, socket_timeout=self._block_ms / 1000 + 5)
            try:
                await self._consume(client)
            except (redis.exceptions.RedisError, OSError) as exc:
                if self.connected:
                    logger.warning("Redis KV-event index disconnected (%s): routing by load only until it returns", exc)
                    # Without events we cannot vouch for any entry: clear now rather than route on stale caches.
                    for worker in self._index.workers():
                        self._index.forget(worker)
                self._set_connected(False)
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff_s, backoff * 2)
            else:
                backoff = 0.1
            finally:
                await client.aclose()

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._on_connected(connected)

    async def _consume(self, client: aioredis.Redis) -> None:
        # Every (re)connection replays the stream from the start: snapshots in it rebuild the index, and
        # entry ids carry the time each was written, so replayed workers that went silent expire at once.
        for worker in self._index.workers():
            self._index.forget(worker)
        last_id = "0"
        await client.ping()
        logger.info("Redis KV-event index connected (%s, stream %s): prefix-aware routing on", self._redis_url, self._key)
        self._set_connected(True)
        while True:
            reply = await client.xread({self._key: last_id}, count=1000, block=self._block_ms)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._apply(entry_id, fields)
            self._index.expire()

    def _apply(self, entry_id: bytes | str, fields: dict) -> None:
        self.entries_read += 1
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        written_at = int(entry_id.split("-", 1)[0]) / 1000.0
        raw = fields.get(b"data", fields.get("data"))
        try:
            message = json.loads(raw)
            # NOTE: never stamp an entry as newer than now, whatever the Redis server's clock says.
            self._index.apply(message, seen_at=min(written_at, time.time()))
        except (TypeError, ValueError, KeyError) as exc:
            logger.warning("skipping malformed KV-event entry %s: %s", entry_id, exc)


class DirectEventConsumer:
    """One ndjson subscription per known worker (``GET /kv_events/stream``), kept in step with the datastore."""

    def __init__(self, datastore: Datastore, index: PrefixIndex, client: httpx.AsyncClient, ttl_s: float) -> None:
        self._datastore = datastore
        self._index = index
        self._client = client
        self._ttl_s = ttl_s
        self._tasks: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        try:
            while True:
                self._reconcile()
                await asyncio.sleep(0.5)
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _reconcile(self) -> None:
        # vLLM workers have no /kv_events/stream: their events come over ZMQ (vllm_events.py).
        urls = {url for url, worker in self._datastore.workers.items() if worker.kind == "tandem"}
        for url in urls - set(self._tasks):
            self._tasks[url] = asyncio.create_task(self._follow(url), name=f"kv-events {url}")
        for url in set(self._tasks) - urls:
            self._tasks.pop(url).cancel()
            self._index.forget(url)

    async def _follow(self, url: str) -> None:
        backoff = 0.2
        while True:
            try:
                # A read timeout a bit above the TTL: heartbeats arrive every second, so silence means trouble.
                timeout = httpx.Timeout(5.0, read=self._ttl_s)
                async with self._client.stream("GET", url + "/kv_events/stream", timeout=timeout) as response:
                    if response.status_code != 200:
                        raise httpx.HTTPStatusError(f"status {response.status_code}", request=response.request, response=response)
                    backoff = 0.2
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        if not self._index.apply(json.loads(line)):
                            logger.info("KV events from %s: resubscribing for a fresh snapshot", url)
                            break
            except (httpx.HTTPError, ValueError) as exc:
                logger.debug("KV events from %s unavailable: %s", url, exc)
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)
