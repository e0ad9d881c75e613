"""The block pool: every KV block, its reference count, the free queue and the prefix-cache map.

NOTE: a block with ``ref_cnt == 0`` sits in the free queue but keeps its hash (and its KV) until it is
handed out again: that is how freed prompts stay cached. The free queue is ordered least recently
used first, so allocation evicts the coldest cached block. Every change to the prefix cache is
recorded as a KV event for the router.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable

from tandem.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class KVCacheBlock:
    """One block of ``block_size`` token slots (all layers). Identity is ``block_id``."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Owns all blocks. The KV-cache manager asks it for blocks; nothing else touches them."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, record_events: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.record_events = record_events
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, least recently used first.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}
        self._events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones, cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def next_free_block_ids(self, n: int) -> list[int]:
        """Ids of the next ``n`` blocks ``get_new_blocks`` would hand out, in that order (fewer if fewer are free)."""
        return list(itertools.islice(self._free, n))

    # ---- allocation ----------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head of the free queue (evicting their cached content)."""
        if n > len(self._free):
            raise ValueError(f"cannot allocate {n} blocks: only {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        # NOTE: which blocks are taken is the LRU's choice; their order is ours. Ascending ids turn a request's
        # blocks into runs of neighbours (a freed request's blocks come back reversed), so KV transfers move a
        # run as one region per layer instead of one per block.
        out.sort(key=lambda b: b.block_id)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on (cached) blocks; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._free.pop(block.block_id, None)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop a reference; blocks reaching zero join the tail of the free queue (most recent).

        NOTE: callers pass a request's blocks in reverse order, so its tail blocks are evicted before
        its head blocks, which other requests are more likely to share.
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    # Uncached blocks are worthless once free: hand them out first.
                    self._free[block.block_id] = block
                    self._free.move_to_end(block.block_id, last=False)
                else:
                    self._free[block.block_id] = block

    # ---- prefix cache --------------------------------------------------------------------------
    def cache_full_blocks(
        self,
        blocks: list[KVCacheBlock],
        block_hashes: list[int],
        token_ids: list[int],
        start: int,
        end: int,
    ) -> None:
        """Mark ``blocks[start:end]`` (now full) with ``block_hashes[start:end]`` and record the event."""
        if not self.enable_caching or start >= end:
            return
        stored: list[int] = []
        for i in range(start, end):
            block, h = blocks[i], block_hashes[i]
            if block.block_hash is not None:
                continue
            if h in self._cached:
                # Another block already holds this content (computed twice concurrently): keep one copy.
                continue
            block.block_hash = h
            self._cached[h] = block
            stored.append(h)
        if stored and self.record_events:
            bs = self.block_size
            parent = block_hashes[start - 1] if start > 0 else None
            self._events.append(
                BlockStored(
                    block_hashes=stored,
                    parent_block_hash=parent,
                    token_ids=list(token_ids[start * bs : end * bs]),
                    block_size=bs,
                )
            )

    def _evict(self, block: KVCacheBlock) -> None:
        h = block.block_hash
        if h is None:
            return
        block.block_hash = None
        if self._cached.get(h) is block:
            del self._cached[h]
            if self.record_events:
                self._events.append(BlockRemoved(block_hashes=[h]))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no request holds a block."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        if self.record_events:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events
