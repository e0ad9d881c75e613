"""The prefix index folds snapshots and event batches, detects gaps, and expires silent workers."""

from __future__ import annotations

import pytest

from tandem.protocol.hashing import hash_block_tokens
from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from tandem.router.index import PrefixIndex

W1 = "http://127.0.0.1:1001"
W2 = "http://127.0.0.1:1002"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def create_index(ttl_s: float = 10.0) -> tuple[PrefixIndex, Clock]:
    clock = Clock()
    return PrefixIndex(ttl_s, clock=clock), clock


def snapshot(worker: str, hashes: list[int], seq: int = 0, block_size: int = 16) -> dict:
    return {"kind": "snapshot", "worker": worker, "model": "m", "seq": seq, "block_size": block_size,
            "block_hashes": hashes}


def batch(worker: str, seq: int, *events) -> dict:
    return {"kind": "batch", "worker": worker, "model": "m", **EventBatch(seq=seq, ts=0.0, events=list(events)).to_dict()}


def stored(hashes: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=16)


def test_matched_blocks_counts_leading_prefix_only():
    index, _ = create_index()
    prompt = hash_block_tokens(list(range(64)), 16)  # 4 blocks
    index.apply(snapshot(W1, [prompt[0], prompt[1], prompt[3]]))
    assert index.matched_blocks(prompt, W1) == 2  # block 3 without block 2 is not a usable prefix
    assert index.matched_blocks(prompt, W2) == 0
    assert index.owners(prompt[0]) == {W1}


def test_batches_store_remove_and_clear():
    index, _ = create_index()
    assert index.apply(snapshot(W1, [], seq=0))
    assert index.apply(batch(W1, 1, stored([1, 2, 3])))
    assert index.matched_blocks([1, 2, 3], W1) == 3
    assert index.apply(batch(W1, 2, BlockRemoved(block_hashes=[2])))
    assert index.matched_blocks([1, 2, 3], W1) == 1
    assert index.owners(2) == frozenset()
    assert index.apply(batch(W1, 3, AllBlocksCleared()))
    assert index.num_blocks(W1) == 0 and index.num_blocks() == 0


def test_snapshot_replaces_previous_knowledge():
    index, _ = create_index()
    index.apply(snapshot(W1, [1, 2]))
    index.apply(snapshot(W2, [1]))
    index.apply(snapshot(W1, [3], seq=7))
    assert index.owners(1) == {W2}
    assert index.owners(3) == {W1}
    assert index.owners(2) == frozenset()


def test_first_batch_after_snapshot_may_repeat_its_seq():
    index, _ = create_index()
    index.apply(snapshot(W1, [1], seq=5))
    assert index.apply(batch(W1, 5, stored([1])))  # already folded into the snapshot: idempotent
    assert index.apply(batch(W1, 6, stored([2])))
    assert not index.apply(batch(W1, 6, stored([3])))  # a repeat later on is a gap


def test_gap_drops_worker_until_next_snapshot():
    index, _ = create_index()
    index.apply(snapshot(W1, [1], seq=0))
    assert index.apply(batch(W1, 1, stored([2])))
    assert not index.apply(batch(W1, 3, stored([4])))  # seq 2 lost
    assert index.num_blocks(W1) == 0 and not index.is_synced(W1)
    assert not index.apply(batch(W1, 4, stored([5])))  # still waiting for a snapshot
    assert index.num_blocks(W1) == 0
    assert index.apply(snapshot(W1, [1, 2, 4, 5], seq=4))
    assert index.matched_blocks([1, 2], W1) == 2


def test_batch_from_unknown_worker_waits_for_snapshot():
    index, _ = create_index()
    assert not index.apply(batch(W1, 3, stored([1])))
    assert index.num_blocks(W1) == 0


def test_silent_worker_expires_and_heartbeats_keep_it_alive():
    index, clock = create_index(ttl_s=10)
    index.apply(snapshot(W1, [1]))
    index.apply(snapshot(W2, [2]))
    clock.now += 8
    index.apply({"kind": "heartbeat", "worker": W1, "model": "m", "seq": 0, "ts": 0})
    clock.now += 5
    assert index.expire() == [W2]
    assert index.owners(1) == {W1} and index.owners(2) == frozenset()


def test_block_size_follows_the_workers():
    index, _ = create_index()
    index.apply(snapshot(W1, [], block_size=32))
    assert index.block_size == 32


def test_malformed_message_is_rejected():
    index, _ = create_index()
    with pytest.raises(ValueError):
        index.apply({"kind": "nope", "worker": W1})
