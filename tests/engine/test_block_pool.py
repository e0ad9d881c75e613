"""Block pool and KV-cache manager on a small fake configuration (no model)."""

import pytest

from helpers import create_request
from tandem.engine.core.block_pool import BlockPool
from tandem.engine.core.kv_cache_manager import KVCacheManager
from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def test_allocate_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = create_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) is not None
    assert kv.pool.num_free_blocks == 5  # ceil(10 / 4) = 3 held
    kv.free(req)
    assert kv.pool.num_free_blocks == 8


def test_allocate_returns_none_without_changing_anything_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = create_request("a", list(range(12)))
    assert kv.allocate_slots(req, 12) is None
    assert kv.pool.num_free_blocks == 2
    assert "a" not in kv.req_to_blocks


def test_prefix_hit_and_miss():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = create_request("a", list(range(10)))
    kv.allocate_slots(first, 10)
    kv.cache_blocks(first, 10)  # two full blocks cached
    kv.free(first)

    same_prefix = create_request("b", list(range(8)) + [99, 98, 97])
    blocks, n = kv.get_computed_blocks(same_prefix)
    assert n == 8 and [b.block_hash for b in blocks] == same_prefix.block_hashes[:2]

    other = create_request("c", [5] + list(range(1, 10)))
    assert kv.get_computed_blocks(other) == ([], 0)
    assert kv.prefix_stats.hits == 8


def test_full_hit_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = create_request("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.cache_blocks(a, 8)
    kv.free(a)
    _, n = kv.get_computed_blocks(create_request("b", list(range(8))))
    assert n == 4  # the last block is recomputed so the step has logits to sample


def test_eviction_is_least_recently_used_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    pool = kv.pool
    old = create_request("old", [1, 2, 3, 4], block_size=2)
    kv.allocate_slots(old, 4)
    kv.cache_blocks(old, 4)
    kv.free(old)
    new = create_request("new", [5, 6, 7, 8], block_size=2)
    kv.allocate_slots(new, 4)
    kv.cache_blocks(new, 4)
    kv.free(new)
    pool.take_events()
    # Two fresh blocks are needed: the least recently freed request ("old") is evicted first,
    # and within it the tail block goes before the head block.
    taken = pool.get_new_blocks(1)
    assert taken[0].block_id == 1  # "old" got blocks 0 and 1 from the fresh pool
    assert isinstance(pool.take_events()[0], BlockRemoved)
    assert pool.get_cached_block(old.block_hashes[0]) is not None
    assert pool.get_cached_block(new.block_hashes[1]) is not None


def test_events_record_stored_removed_and_cleared():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    a = create_request("a", [1, 2, 3, 4], block_size=2)
    kv.allocate_slots(a, 4)
    kv.cache_blocks(a, 4)
    events = kv.take_events()
    assert events == [BlockStored(block_hashes=a.block_hashes, parent_block_hash=None, token_ids=[1, 2, 3, 4],
                                  block_size=2)]
    kv.free(a)
    assert kv.pool.reset_prefix_cache()
    assert kv.take_events() == [AllBlocksCleared()]


def test_double_free_is_detected():
    pool = BlockPool(2, 4)
    blocks = pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free_blocks(blocks)
