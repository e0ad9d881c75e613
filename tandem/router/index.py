"""The prefix index: which worker holds which KV block, folded from the engines' own KV events.

NOTE: the index is precise, not guessed: entries only come from events the workers published (snapshots and
event batches), never from the router's own routing decisions. A worker that stops publishing (no event,
batch or heartbeat for ``ttl_s``) has all of its entries dropped, so the router never steers traffic to a
cache it can no longer vouch for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, event_from_dict

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _WorkerState:
    """What the index knows of one worker's cache and of the freshness of that knowledge."""

    blocks: set[int]
    last_seen: float
    seq: int | None
    # False after a gap in ``seq`` until the next snapshot: batches are ignored meanwhile because
    # applying them on top of a hole would leave phantom or missing blocks.
    synced: bool
    after_snapshot: bool = False


class PrefixIndex:
    """Block hash -> workers holding it, plus per-worker freshness for TTL expiry.

    ``apply(message)`` takes one message of the KV-events wire format (snapshot, batch or heartbeat; see
    docs/interfaces.md) and returns False when it reveals a gap (the caller should resynchronise).
    Timestamps are wall-clock seconds (``time.time``) so that Redis catch-up can stamp entries with
    when they were written rather than when they were read.
    """

    def __init__(self, ttl_s: float, default_block_size: int = 16, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.block_size = default_block_size
        self._clock = clock
        self._owners: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerState] = {}

    # ---- writing (event consumers only) ----

    def apply(self, message: dict[str, Any], seen_at: float | None = None) -> bool:
        """Fold one wire message into the index. Returns False on a sequence gap (resync needed)."""
        kind = message.get("kind")
        worker = message.get("worker")
        if not isinstance(worker, str) or kind not in ("snapshot", "batch", "heartbeat"):
            raise ValueError(f"malformed KV-events message: kind={kind!r} worker={worker!r}")
        worker = worker.rstrip("/")
        now = self._clock() if seen_at is None else seen_at
        seq = message.get("seq")
        seq = int(seq) if seq is not None else None
        if kind == "snapshot":
            self._replace(worker, (int(h) for h in message.get("block_hashes", ())), now, seq)
            if message.get("block_size"):
                self.block_size = int(message["block_size"])
            return True
        state = self._workers.get(worker)
        if state is None:
            # A worker we have no snapshot of: until one arrives we know nothing trustworthy about
            # its cache, but its batches are still a valid delta on an empty cache only if it just
            # started; we cannot tell, so wait for a snapshot.
            self._workers[worker] = _WorkerState(blocks=set(), last_seen=now, seq=seq, synced=False)
            return False
        state.last_seen = max(state.last_seen, now)
        if kind == "heartbeat":
            # Heartbeats only prove liveness; sequence checks are done on batches, whose order is exact.
            return state.synced
        if seq is not None and state.seq is not None:
            # Right after a snapshot stamped S the next batch may be S (already folded into the snapshot:
            # re-applying it is idempotent) or S + 1; afterwards batches must follow one by one.
            expected = (state.seq, state.seq + 1) if state.after_snapshot else (state.seq + 1,)
            if seq not in expected:
                return self._gap(worker, state, seq)
        state.seq = seq
        state.after_snapshot = False
        if not state.synced:
            return False
        for event_dict in message.get("events", ()):
            self._apply_event(worker, state, event_from_dict(event_dict))
        return True

    def _gap(self, worker: str, state: _WorkerState, seq: int) -> bool:
        if state.synced:
            logger.warning("KV events from %s: sequence gap (had %s, got %s); dropping its entries until a snapshot",
                           worker, state.seq, seq)
        self._drop_blocks(worker, state)
        state.synced = False
        state.seq = seq
        return False

    def _apply_event(self, worker: str, state: _WorkerState, event: Any) -> None:
        if isinstance(event, BlockStored):
            if event.block_size:
                self.block_size = int(event.block_size)
            for block_hash in event.block_hashes:
                block_hash = int(block_hash)
                state.blocks.add(block_hash)
                self._owners.setdefault(block_hash, set()).add(worker)
        elif isinstance(event, BlockRemoved):
            for block_hash in event.block_hashes:
                block_hash = int(block_hash)
                state.blocks.discard(block_hash)
                self._unown(block_hash, worker)
        elif isinstance(event, AllBlocksCleared):
            self._drop_blocks(worker, state)

    def _replace(self, worker: str, hashes: Iterable[int], now: float, seq: int | None) -> None:
        state = self._workers.get(worker)
        if state is not None:
            self._drop_blocks(worker, state)
        blocks = set(hashes)
        for block_hash in blocks:
            self._owners.setdefault(block_hash, set()).add(worker)
        self._workers[worker] = _WorkerState(blocks=blocks, last_seen=now, seq=seq, synced=True, after_snapshot=True)

    def _drop_blocks(self, worker: str, state: _WorkerState) -> None:
        for block_hash in state.blocks:
            self._unown(block_hash, worker)
        state.blocks = set()

    def _unown(self, block_hash: int, worker: str) -> None:
        owners = self._owners.get(block_hash)
        if owners is not None:
            owners.discard(worker)
            if not owners:
                del self._owners[block_hash]

    def forget(self, worker: str) -> None:
        """Drop everything known about ``worker`` (it left, or its event channel is being reset)."""
        state = self._workers.pop(worker.rstrip("/"), None)
        if state is not None:
            self._drop_blocks(worker.rstrip("/"), state)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop the entries of workers silent for longer than the TTL; returns the workers expired."""
        now = self._clock() if now is None else now
        expired = [w for w, s in self._workers.items() if now - s.last_seen > self.ttl_s]
        for worker in expired:
            logger.warning("KV events from %s: silent for more than %.1fs; dropping its %d index entries",
                           worker, self.ttl_s, len(self._workers[worker].blocks))
            self.forget(worker)
        return expired

    # ---- reading (the picking path) ----

    def matched_blocks(self, block_hashes: Sequence[int], worker: str) -> int:
        """How many of the leading blocks of ``block_hashes`` ``worker`` holds (a prefix, so stop at the first miss)."""
        state = self._workers.get(worker)
        if state is None or not state.blocks:
            return 0
        count = 0
        for block_hash in block_hashes:
            if block_hash not in state.blocks:
                break
            count += 1
        return count

    def owners(self, block_hash: int) -> frozenset[str]:
        return frozenset(self._owners.get(block_hash, ()))

    def workers(self) -> list[str]:
        return list(self._workers)

    def num_blocks(self, worker: str | None = None) -> int:
        if worker is None:
            return len(self._owners)
        state = self._workers.get(worker)
        return len(state.blocks) if state else 0

    def is_synced(self, worker: str) -> bool:
        state = self._workers.get(worker)
        return bool(state and state.synced)
