"""The paged-KV plumbing every model family shares: block tables, slot mapping, KV writes.

The cache is one block-major buffer (``core/kv_layout.py``); this module only computes where things are in it.
A sliding-window layer's tables start at the first block that holds a key inside the window of the chunk's
first query: blocks wholly outside the window are neither gathered nor attended.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.engine.attention.metadata import FreshPrefillBatch, PrefillSeq
from tandem.engine.core.kv_layout import KVCacheLayout


def first_key_block(query_pos: int, window: int | None, block_size: int) -> int:
    """The first block a query at ``query_pos`` may attend to: 0 without a window, else the block holding key
    ``query_pos - window + 1`` (a query sees the ``window`` keys ending at itself, as transformers masks)."""
    if window is None:
        return 0
    return max(0, query_pos - window + 1) // block_size


def window_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query may attend a key: causal, and inside the window if there is one (broadcasting)."""
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


class PagedKVIndexer:
    """Index arithmetic over one ``KVCacheLayout``: rows of blocks, token slots, per-batch tables and masks."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        # Row of (layer, K/V, head) in block 0, [L, 2, kvh]: + block * rows_per_block gives any block's row.
        self._layer_rows = torch.tensor(
            [[[layout.row_index(0, layer, kind, head) for head in range(layout.num_kv_heads)] for kind in (0, 1)]
             for layer in range(layout.num_layers)],
            dtype=torch.long,
        )

    def rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Cache rows of ``block_ids`` for every layer: ``[L, 2 * kv_heads * len(block_ids)]``, (K/V, head, block)."""
        rows = block_ids * self.layout.rows_per_block + self._layer_rows.unsqueeze(-1)
        return rows.view(self.layout.num_layers, -1)

    def token_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Token-vector index of each flat slot for every layer: ``[L, 2 * kv_heads * T]``, (K/V, head, token)."""
        bs = self.block_size
        base = (slots // bs) * (self.layout.rows_per_block * bs) + slots % bs
        return (base + self._layer_rows.unsqueeze(-1) * bs).view(self.layout.num_layers, -1)

    def prefill_seq(self, q_start: int, block_ids: Sequence[int], ctx_len: int, q_len: int,
                    window: int | None) -> PrefillSeq:
        """A prefill chunk of ``q_len`` tokens ending at ``ctx_len``; with a cached prefix its rows cover the blocks
        from the first one inside the window of its first query up to ``ctx_len``."""
        start = ctx_len - q_len
        if start == 0:
            return PrefillSeq(q_start, q_len, ctx_len, None)
        first = first_key_block(start, window, self.block_size)
        last = -(-ctx_len // self.block_size)
        rows = self.rows(torch.tensor(block_ids[first:last], dtype=torch.long))
        return PrefillSeq(q_start, q_len, ctx_len, rows, first * self.block_size)

    def paged_batch(self, seqs: Sequence[tuple[Sequence[int], int]], q_len: int,
                    window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows and mask for sequences (``(block_ids, ctx_len)``) each computing its last ``q_len`` tokens
        over its cached context, attended as one batch (decodes: ``q_len`` 1; verify chunks: the last token and
        its drafts).

        Returns ``[num_layers, 2 * kv_heads * B * max_blocks]`` rows (a sequence's unused table slots gather block
        0, masked out) and a ``[1, B, 1, q_len, max_blocks * block_size]`` mask: query i of a sequence sits at
        position ``ctx - q_len + i`` and sees the keys up to it (and, with a window, no further back than it).
        """
        bs = self.block_size
        ctx = torch.tensor([c for _, c in seqs], dtype=torch.long)
        first = torch.tensor([first_key_block(c - q_len, window, bs) for _, c in seqs], dtype=torch.long)
        nblk = (ctx + bs - 1) // bs - first
        max_blocks = int(nblk.max())
        table = torch.zeros(len(seqs), max_blocks, dtype=torch.long)
        for row, (ids, _) in enumerate(seqs):
            f, n = int(first[row]), int(nblk[row])
            table[row, :n] = torch.tensor(ids[f : f + n], dtype=torch.long)
        key_pos = (first * bs).unsqueeze(1) + torch.arange(max_blocks * bs).unsqueeze(0)  # [B, L]
        query_pos = ctx.unsqueeze(1) - q_len + torch.arange(q_len).unsqueeze(0)  # [B, Q]
        mask = window_mask(key_pos.unsqueeze(1), query_pos.unsqueeze(2), window)  # [B, Q, L]
        return self.rows(table.flatten()), mask.view(1, len(seqs), 1, q_len, -1)


def fresh_prefill_batch(prefills: list[PrefillSeq], window: int | None = None) -> FreshPrefillBatch | None:
    """The prefill chunks with no cached prefix as one padded batch, on the host (None for fewer than two)."""
    fresh = [seq for seq in prefills if seq.gather_rows is None]
    if len(fresh) < 2:
        return None
    lengths = torch.tensor([seq.q_len for seq in fresh])
    pos = torch.arange(int(lengths.max()))
    valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [n, S]
    starts = torch.tensor([seq.q_start for seq in fresh]).unsqueeze(1)
    token_index = torch.where(valid, starts + pos.unsqueeze(0), starts)
    mask = window_mask(pos.unsqueeze(0), pos.unsqueeze(1), window).unsqueeze(0) & valid.unsqueeze(1)  # [n, Sq, Sk]
    return FreshPrefillBatch(token_index, valid, mask.unsqueeze(1))


def write_kv(kv_rows: torch.Tensor, write_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store a layer's new keys and values ``[T, kv_heads, D]`` at their slots (``write_index``: that layer's
    ``[2 * kv_heads * T]`` token-vector indices, (K/V, head, token) order)."""
    D = k.shape[-1]
    new_kv = torch.stack((k, v)).transpose(1, 2).reshape(-1, D)  # [(K/V, head, token), D]
    kv_rows.view(-1, D).index_copy_(0, write_index, new_kv)
