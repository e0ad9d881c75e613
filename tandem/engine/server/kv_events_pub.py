"""Publishing the engine's KV events: a direct NDJSON stream and, optionally, a Redis stream.

The wire format is documented in docs/interfaces.md. The hub keeps a mirror of the cached block
hashes (built from the events themselves, on the event loop) so a new reader gets a consistent
snapshot at a sequence number, then every later batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, event_to_dict

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
REDIS_SNAPSHOT_S = 30.0
REDIS_MAXLEN = 100_000


def redis_stream_key(model_name: str) -> str:
    return f"tandem:kv_events:{model_name}"


class KVEventHub:
    def __init__(self, worker_url: str, model_name: str, block_size: int) -> None:
        self.worker_url = worker_url
        self.model_name = model_name
        self.block_size = block_size
        self.seq = 0
        self.hashes: set[int] = set()
        self._subscribers: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish_threadsafe(self, events: list[KVEvent]) -> None:
        """Called on the engine thread with the events drained after a step."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply, events)

    def _apply(self, events: list[KVEvent]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                self.hashes.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                self.hashes.difference_update(e.block_hashes)
            elif isinstance(e, AllBlocksCleared):
                self.hashes.clear()
        self.seq += 1
        if not self._subscribers:  # the mirror above is all a later reader needs (its snapshot)
            return
        batch = self._message("batch", ts=time.time(), events=[event_to_dict(e) for e in events])
        for q in list(self._subscribers):
            try:
                q.put_nowait(batch)
            except asyncio.QueueFull:  # a reader too slow to keep up: drop it; it reconnects and resyncs
                self._subscribers.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    def _message(self, kind: str, **fields) -> dict:
        return {"kind": kind, "worker": self.worker_url, "model": self.model_name, "seq": self.seq, **fields}

    def snapshot(self) -> dict:
        return self._message("snapshot", block_size=self.block_size, block_hashes=sorted(self.hashes))

    def heartbeat(self) -> dict:
        return self._message("heartbeat", ts=time.time())

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    async def ndjson_stream(self) -> AsyncIterator[bytes]:
        """Snapshot, then batches as they happen, with heartbeats when idle."""
        q = self.subscribe()
        try:
            yield (json.dumps(self.snapshot()) + "\n").encode()
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    msg = self.heartbeat()
                if msg is None:
                    return
                yield (json.dumps(msg) + "\n").encode()
        finally:
            self.unsubscribe(q)


class RedisKVEventPublisher:
    """Forwards the hub's messages to a Redis stream; reconnects with backoff when Redis goes away."""

    def __init__(self, hub: KVEventHub, redis_url: str) -> None:
        self.hub = hub
        self.redis_url = redis_url
        self.key = redis_stream_key(hub.model_name)
        self.connected = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kv-events-redis")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                logger.debug("KV events publisher stopped")

    async def _run(self) -> None:
        import redis.asyncio as aioredis

        backoff = 0.5
        while True:
            client = aioredis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
            q = self.hub.subscribe()
            try:
                await self._xadd(client, self.hub.snapshot())
                self.connected, backoff = True, 0.5
                logger.info("publishing KV events to %s stream %s", self.redis_url, self.key)
                last_snapshot = time.monotonic()
                while True:
                    try:
                        msg = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        msg = self.hub.heartbeat()
                    if msg is None:
                        break  # fell behind: resubscribe and resync with a snapshot
                    await self._xadd(client, msg)
                    if time.monotonic() - last_snapshot > REDIS_SNAPSHOT_S:
                        await self._xadd(client, self.hub.snapshot())
                        last_snapshot = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    logger.warning("KV events: Redis %s unavailable (%s); retrying", self.redis_url, exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.hub.unsubscribe(q)
                await client.aclose()

    async def _xadd(self, client, msg: dict) -> None:
        await client.xadd(self.key, {"data": json.dumps(msg)}, maxlen=REDIS_MAXLEN, approximate=True)
