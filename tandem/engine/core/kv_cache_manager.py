"""The KV-cache manager: which blocks each request holds, prefix lookup, allocate and free.

NOTE: ``allocate_slots`` returns None when the pool cannot satisfy a request; the scheduler decides
what to do about it (wait or preempt). Nothing here knows about scheduling policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.core.block_pool import BlockPool, KVCacheBlock
from tandem.engine.core.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found cached


class KVCacheManager:
    """A request's blocks, prefix lookup, allocate and free.

    With ``sliding_window`` (only for models whose every layer attends within a window of at most that many
    keys), a request's leading blocks that no later query can attend are given back to the pool as its KV grows
    (they stay in the prefix cache until evicted); its table keeps None in their place.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 sliding_window: int | None = None):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock | None]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._num_released_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request, record: bool = True) -> tuple[list[KVCacheBlock], int]:
        """The longest run of the request's leading full blocks already in the cache; ``record``: count the lookup
        in the prefix-cache stats now (the scheduler counts it with ``record_lookup`` once it admits the request,
        so a request that waits is counted once).

        NOTE: at least one token is always left to compute, so the step produces logits to sample from.
        """
        if not self.enable_caching or request.num_computed_tokens > 0:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        num_tokens = len(hits) * self.block_size
        if record:
            self.record_lookup(request, num_tokens)
        return hits, num_tokens

    def record_lookup(self, request: Request, num_cached_tokens: int) -> None:
        if not self.enable_caching:
            return
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += num_cached_tokens

    def blocks_needed(self, request: Request, num_new_tokens: int, num_new_computed_blocks: int = 0) -> int:
        held = len(self.req_to_blocks.get(request.request_id, ())) + num_new_computed_blocks
        total = request.num_computed_tokens + num_new_computed_blocks * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - held)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after ``new_computed_blocks``).

        Returns the newly allocated blocks, or None (and changes nothing) if the pool is too small.
        """
        new_computed_blocks = new_computed_blocks or []
        num_needed = self.blocks_needed(request, num_new_tokens, len(new_computed_blocks))
        # Cached hits that are currently free will leave the free queue when touched.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            return None
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self._num_cached_blocks[request.request_id] = len(blocks)
        new_blocks = self.pool.get_new_blocks(num_needed) if num_needed else []
        blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """The request's KV now covers ``num_computed_tokens``: its full blocks enter the prefix cache, and with a
        sliding window, the blocks no later query can attend go back to the pool (see ``release_outside_window``)."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        if not blocks:
            return
        start = self._num_cached_blocks.get(rid, 0)
        end = min(num_computed_tokens // self.block_size, len(request.block_hashes), len(blocks))
        if self.enable_caching and end > start:
            self.pool.cache_full_blocks(blocks, request.block_hashes, request.all_token_ids, start, end)
            self._num_cached_blocks[rid] = end
        self.release_outside_window(request, num_computed_tokens)

    def release_outside_window(self, request: Request, num_computed_tokens: int) -> int:
        """Give back the request's leading blocks wholly before the window of its next query (at position
        ``num_computed_tokens``, which sees keys from ``num_computed_tokens - window + 1`` on); returns how many.

        NOTE: runs after ``cache_blocks`` has cached them (they are full and computed), so a later prompt with the
        same prefix can still hit them until they are evicted. Attention never reads them again: its tables
        start at the window's first block (``attention/paged.py``), the same block computed here.
        """
        if self.sliding_window is None:
            return 0
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid)
        first_needed = max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size
        start = self._num_released_blocks.get(rid, 0)
        if not blocks or first_needed <= start:
            return 0
        released = [b for b in blocks[start:first_needed] if b is not None]
        blocks[start:first_needed] = [None] * (first_needed - start)
        self._num_released_blocks[rid] = first_needed
        self.pool.free_blocks(reversed(released))
        return len(released)

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        self._num_released_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(b for b in reversed(blocks) if b is not None)

    def block_ids(self, request_id: str) -> list[int | None]:
        """The request's block table; None where a sliding window released the block."""
        return [None if b is None else b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def take_events(self):
        return self.pool.take_events()
