"""vLLM's KV events (ZMQ PUB, msgpack) folded into the router's prefix index, in Tandem's own block hashes.

vLLM publishes with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint":
"tcp://*:5557", "topic": "kv-events"}'``: multipart messages ``[topic, seq (8 bytes, big-endian), payload]``
where the payload is a msgpack ``KVEventBatch``, an array ``[ts, events, data_parallel_rank?]`` whose events
are maps tagged by ``type``: ``BlockStored`` (``block_hashes``, ``parent_block_hash``, ``token_ids``,
``block_size``, ``extra_keys``, ...), ``BlockRemoved`` (``block_hashes``) and ``AllBlocksCleared``
(vllm/distributed/kv_events.py in vLLM 0.32).

NOTE: vLLM's hashes (sha256 bytes, or ints, salted per process by ``PYTHONHASHSEED``-like seeds) are never
compared with ours. ``BlockStored`` carries the token ids, so ``VllmEventTranslator`` recomputes each block's
hash with ``tandem.protocol.hashing`` from its parent's *Tandem* hash and its tokens, and keeps a per-worker map
vLLM hash -> Tandem hash to translate parents and removals. The index then receives ordinary
snapshot/batch/heartbeat messages (the same ones Tandem workers send), so scorers, Redis replicas and metrics
treat both engine kinds alike.

Ordering: vLLM numbers batches 0, 1, 2, ... per process. Batches missed (before the router subscribed, or lost) are
fetched from vLLM's replay socket when the worker has one (``replay=``), in order, before the batch that revealed
the hole. Otherwise a gap (a batch lost under the high-water mark, a
slow subscriber) drops the worker's index entries: what it stored or removed in the hole is unknown, so its
cache is relearned from the next events on. A sequence that goes backwards is a restarted vLLM (a new stream):
everything about the old process is forgotten. A publisher that goes silent keeps its entries only as long as
the worker passes its health checks (vLLM publishes nothing when idle, so liveness comes from /health, which
the same process serves); a dead worker's entries expire with the index TTL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack

from tandem.protocol.hashing import hash_block

logger = logging.getLogger(__name__)

# What ``--vllm-kv-events-port`` defaults to: vLLM's own default endpoint, ``tcp://*:5557``.
DEFAULT_KV_EVENTS_PORT = 5557
DEFAULT_TOPIC = "kv-events"
# vLLM's replay socket ends an answer with sequence number -1.
_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class VllmEventError(ValueError):
    """A message that is not a vLLM KV-event batch."""


@dataclass(slots=True)
class _Translation:
    """What one ``translate`` call produced for the index."""

    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    cleared: bool = False
    skipped_blocks: int = 0  # BlockStored blocks whose parent chain we do not know


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]]]:
    """Decode one msgpack ``KVEventBatch`` payload into ``(ts, events)``; events are tagged maps."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise VllmEventError(f"not msgpack: {exc}") from exc
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], list):
        raise VllmEventError(f"not a KVEventBatch array [ts, events, ...]: {type(batch).__name__}")
    events = batch[1]
    for event in events:
        if not isinstance(event, dict) or "type" not in event:
            raise VllmEventError(f"event is not a tagged map: {event!r:.80}")
    return float(batch[0]), events


def _validate(event: dict[str, Any]) -> None:
    """Raise VllmEventError unless ``event`` has what translating it needs."""
    hashes = event.get("block_hashes") or []
    if not isinstance(hashes, list):
        raise VllmEventError(f"{event['type']}.block_hashes must be a list")
    for value in hashes:
        _hash_key(value)
    if event["type"] != "BlockStored":
        return
    block_size, token_ids = event.get("block_size"), event.get("token_ids") or []
    if not isinstance(block_size, int) or block_size <= 0:
        raise VllmEventError(f"BlockStored.block_size must be a positive int, got {block_size!r}")
    if not isinstance(token_ids, list) or len(token_ids) < len(hashes) * block_size:
        raise VllmEventError(f"BlockStored: {len(hashes)} blocks of {block_size} need "
                             f"{len(hashes) * block_size} token ids, got {len(token_ids)}")
    parent = event.get("parent_block_hash")
    if parent is not None:
        _hash_key(parent)


def _hash_key(value: Any) -> bytes | int:
    """vLLM hashes are bytes (sha256, the default) or ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``)."""
    if isinstance(value, (bytes, int)) and not isinstance(value, bool):
        return value
    raise VllmEventError(f"block hash must be bytes or int, got {type(value).__name__}")


class VllmEventTranslator:
    """One vLLM worker's event stream -> Tandem block hashes, with sequence tracking.

    ``accept(seq, payload)`` returns the index messages to apply (a ``batch``, or a ``snapshot`` after a
    restart/gap) for ``worker``; ``snapshot()`` re-states everything currently believed (used when the index
    lost the worker, e.g. a Redis reconnect cleared it).
    """

    def __init__(self, worker: str) -> None:
        self.worker = worker
        # vLLM hash -> Tandem hash, for every block vLLM currently holds (as far as we know).
        self._ours: dict[bytes | int, int] = {}
        self.block_size: int | None = None
        self.last_seq: int | None = None
        self.gaps = 0
        self.restarts = 0
        self.skipped_blocks = 0

    def held(self) -> list[int]:
        """Tandem hashes of the blocks the worker holds, as far as the events told us."""
        return list(self._ours.values())

    def restart(self, seq: int) -> None:
        """The publisher started again (its numbering went back to ``seq``): forget the old process entirely."""
        self.restarts += 1
        logger.info("vLLM KV events from %s: sequence restarted (%d after %s): a new process",
                    self.worker, seq, self.last_seq)
        self._ours.clear()
        self.last_seq = None

    def snapshot(self) -> dict[str, Any]:
        """An index snapshot message stating everything this translator believes."""
        return {"kind": "snapshot", "worker": self.worker, "seq": None, "block_hashes": self.held(),
                "block_size": self.block_size}

    def accept(self, seq: int, payload: bytes) -> list[dict[str, Any]]:
        """Fold one published batch; returns the index messages it implies (in order)."""
        _ts, events = decode_batch(payload)
        for event in events:
            _validate(event)  # before anything changes: a bad batch leaves the translator as it was
        messages: list[dict[str, Any]] = []
        if self.last_seq is None:
            messages.append(self.snapshot())  # the first batch seen: the index starts from what we know (nothing)
        elif seq != self.last_seq + 1:
            if seq <= self.last_seq:
                # Numbers start again at 0 in a new vLLM process: nothing of the old one's cache survives.
                self.restart(seq)
            else:
                # Batches were lost: what was stored or removed in the hole is unknown. Forget ownership and
                # relearn from here (replaying is not possible without vLLM's replay endpoint).
                self.gaps += 1
                logger.warning("vLLM KV events from %s: sequence gap (had %d, got %d); relearning its cache",
                               self.worker, self.last_seq, seq)
                self._ours.clear()
            messages.append(self.snapshot())
        self.last_seq = seq
        result = self._translate(events)
        if result.cleared:
            messages.append(self.snapshot())  # an empty one, then whatever the same batch stored after
            result.cleared = False
        batch_events: list[dict[str, Any]] = []
        if result.stored:
            batch_events.append({"type": "BlockStored", "block_hashes": result.stored, "parent_block_hash": None,
                                 "token_ids": [], "block_size": self.block_size or 0})
        if result.removed:
            batch_events.append({"type": "BlockRemoved", "block_hashes": result.removed})
        # NOTE: the index checks its own sequence per worker; the translator already ordered the stream, so
        # batches go in unnumbered and are applied as they come.
        messages.append({"kind": "batch", "worker": self.worker, "seq": None, "events": batch_events})
        return messages

    def _translate(self, events: Iterable[dict[str, Any]]) -> _Translation:
        out = _Translation()
        for event in events:
            kind = event["type"]
            if kind == "BlockStored":
                self._stored(event, out)
            elif kind == "BlockRemoved":
                for vllm_hash in event.get("block_hashes") or ():
                    ours = self._ours.pop(_hash_key(vllm_hash), None)
                    if ours is not None:
                        out.removed.append(ours)
                        if ours in out.stored:
                            out.stored.remove(ours)
            elif kind == "AllBlocksCleared":
                self._ours.clear()
                out.stored.clear()
                out.removed.clear()
                out.cleared = True
            # Other event types (newer vLLM versions) carry nothing the prefix index needs.
        self.skipped_blocks += out.skipped_blocks
        return out

    def _stored(self, event: dict[str, Any], out: _Translation) -> None:
        block_size = event["block_size"]
        token_ids = event.get("token_ids") or []
        hashes = [_hash_key(h) for h in event.get("block_hashes") or ()]
        if event.get("group_idx") not in (None, 0):
            return  # a second KV-cache group (hybrid models): its blocks mirror group 0's prefix
        self.block_size = block_size
        parent_vllm = event.get("parent_block_hash")
        if parent_vllm is None:
            parent: int | None = None
        else:
            parent = self._ours.get(_hash_key(parent_vllm))
            if parent is None:
                # The chain's start is unknown (stored before we subscribed, or in a gap): these blocks
                # cannot be named in our hashes, so they are left out rather than guessed.
                out.skipped_blocks += len(hashes)
                return
        extra_keys = event.get("extra_keys") or [None] * len(hashes)
        for i, vllm_hash in enumerate(hashes):
            tokens = token_ids[i * block_size:(i + 1) * block_size]
            # LoRA, multimodal and cache-salt keys make a different block than the bare tokens: keep them in the
            # hash, so a plain prompt never matches them (the router hashes prompts without extra keys).
            extra = extra_keys[i] if i < len(extra_keys) else None
            parent = hash_block(parent, tokens, tuple(extra) if extra else None)
            self._ours[vllm_hash] = parent
            out.stored.append(parent)


def events_endpoint(worker_url: str, port: int) -> str:
    """The ZMQ endpoint of a vLLM worker's publisher: the worker URL's host on ``port``."""
    host = urlsplit(worker_url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


class VllmEventConsumer:
    """One ZMQ SUB per vLLM worker in the datastore, kept in step with it, feeding the prefix index.

    Every ``interval_s`` it also vouches for each healthy vLLM worker with a heartbeat (vLLM publishes nothing
    while idle), and re-states a worker's blocks as a snapshot whenever the index has lost it (a Redis
    reconnect clears the index; a worker that was unhealthy for longer than the TTL expired).
    """

    def __init__(self, datastore: Any, index: Any, default_port: int = DEFAULT_KV_EVENTS_PORT,
                 topic: str = DEFAULT_TOPIC, interval_s: float = 0.5, default_replay_port: int | None = None) -> None:
        self._datastore = datastore
        self._index = index
        self._default_port = default_port
        self._default_replay_port = default_replay_port
        self._topic = topic
        self._interval_s = interval_s
        self._tasks: dict[str, asyncio.Task] = {}
        self.translators: dict[str, VllmEventTranslator] = {}
        self.batches = 0
        self.malformed = 0
        self.replayed = 0

    def endpoint_of(self, worker: Any) -> str:
        """The worker's own endpoint if it has one, else its host on the default port."""
        return worker.kv_events_endpoint or events_endpoint(worker.url, self._default_port)

    def replay_of(self, worker: Any) -> str | None:
        """The worker's own replay endpoint, else its host on the default replay port if there is one."""
        if worker.kv_events_replay is not None:
            return worker.kv_events_replay
        if self._default_replay_port is None:
            return None
        return events_endpoint(worker.url, self._default_replay_port)

    async def run(self) -> None:
        import zmq.asyncio

        context = zmq.asyncio.Context()
        try:
            while True:
                self._reconcile(context)
                self._vouch()
                await asyncio.sleep(self._interval_s)
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            context.destroy(linger=0)

    def _vllm_workers(self) -> dict[str, Any]:
        return {url: w for url, w in self._datastore.workers.items() if w.kind == "vllm"}

    def _reconcile(self, context: Any) -> None:
        workers = self._vllm_workers()
        for url in workers.keys() - self._tasks.keys():
            translator = self.translators[url] = VllmEventTranslator(url)
            self._tasks[url] = asyncio.create_task(
                self._follow(context, self.endpoint_of(workers[url]), self.replay_of(workers[url]), translator),
                name=f"vllm-kv-events {url}")
        for url in self._tasks.keys() - workers.keys():
            self._tasks.pop(url).cancel()
            self.translators.pop(url, None)
            self._index.forget(url)

    def _vouch(self) -> None:
        for url, worker in self._vllm_workers().items():
            translator = self.translators.get(url)
            if translator is None or not worker.healthy or translator.last_seq is None:
                continue  # an unhealthy worker is not vouched for: its entries expire with the TTL
            if not self._index.apply({"kind": "heartbeat", "worker": url}):
                self._index.apply(translator.snapshot())

    async def _follow(self, context: Any, endpoint: str, replay: str | None, translator: VllmEventTranslator) -> None:
        import zmq

        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        # NOTE: ZMQ reconnects by itself (a restarted vLLM comes back on the same socket); the translator
        # notices the restart from the sequence numbers starting again.
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        socket.subscribe(self._topic.encode())
        socket.connect(endpoint)
        logger.info("vLLM KV events: subscribed to %s (topic %r) for %s", endpoint, self._topic, translator.worker)
        # With a replay socket, what the worker published before we subscribed is fetched at once (a router replica
        # started late learns the caches already there); batches the SUB socket also delivers are then skipped.
        duplicates_through: int | None = None
        if replay is not None:
            for missed in await self._replay(context, replay, 0, 2**63, translator.worker):
                self._on_message(translator, missed)
            duplicates_through = translator.last_seq
        try:
            while True:
                frames = await socket.recv_multipart()
                if duplicates_through is not None and len(frames) == 3 and len(frames[1]) == 8:
                    if int.from_bytes(frames[1], "big") <= duplicates_through:
                        continue
                    duplicates_through = None
                if replay is not None and len(frames) == 3 and len(frames[1]) == 8:
                    seq = int.from_bytes(frames[1], "big")
                    if translator.last_seq is not None and seq <= translator.last_seq:
                        translator.restart(seq)  # a new vLLM process: its earlier batches are replayed below
                    expected = 0 if translator.last_seq is None else translator.last_seq + 1
                    if seq > expected:
                        # Batches were missed (before we subscribed, or dropped): fetch them from vLLM's replay
                        # buffer first, so the stream is applied whole and in order.
                        for missed in await self._replay(context, replay, expected, seq, translator.worker):
                            self._on_message(translator, missed)
                self._on_message(translator, frames)
        finally:
            socket.close(linger=0)

    async def _replay(self, context: Any, endpoint: str, start: int, stop: int, worker: str,
                      timeout_s: float = 2.0) -> list[list[bytes]]:
        """Batches ``start`` .. ``stop - 1`` from vLLM's replay socket (ROUTER): we send ``[b"", start]``, it answers
        ``[b"", topic, seq, payload]`` per buffered batch from ``start`` on, then ``[b"", b"", -1, b""]``."""
        import zmq

        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        batches: list[list[bytes]] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(timeout_s * 1000):
                    logger.warning("vLLM KV events from %s: replay from %d timed out after %d batches",
                                   worker, start, len(batches))
                    break
                frames = await dealer.recv_multipart()
                if len(frames) != 4 or frames[2] == _END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big")
                if start <= seq < stop:
                    batches.append(frames[1:])
        finally:
            dealer.close(linger=0)
        self.replayed += len(batches)
        return batches

    def _on_message(self, translator: VllmEventTranslator, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.malformed += 1
            logger.warning("vLLM KV events from %s: expected [topic, 8-byte seq, payload], got %d frame(s) of %s bytes",
                           translator.worker, len(frames), [len(f) for f in frames])
            return
        seq = int.from_bytes(frames[1], "big")
        try:
            messages = translator.accept(seq, frames[2])
        except VllmEventError as exc:
            self.malformed += 1
            logger.warning("vLLM KV events from %s: skipping batch %d: %s", translator.worker, seq, exc)
            return
        self.batches += 1
        for message in messages:
            if not self._index.apply(message):
                self._index.apply(translator.snapshot())
