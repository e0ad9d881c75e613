"""What one step's attention reads: how the flat tokens of a step map onto the paged KV cache.

Built once per step by the model runner (index arithmetic in ``paged.py``) and passed to the model as an
argument, never through a module global. Layers with a sliding window read through their own ``PagedReads``
(their block tables start at the first block inside the window); full-attention layers read through the
``None`` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class PrefillSeq:
    """One prefill chunk in the packed batch."""

    q_start: int  # offset of its first token in the flat batch
    q_len: int
    ctx_len: int  # tokens in the cache after this chunk (prefix + chunk)
    # [num_layers, 2 * kv_heads * blocks]: cache rows of the blocks covering keys kv_start..ctx_len, in
    # (K/V, head, block) order, per layer; None when the chunk has no cached prefix (it attends to its own keys).
    gather_rows: torch.Tensor | None = None
    kv_start: int = 0  # position of the first gathered key (a block boundary; > 0 when a window skips blocks)


@dataclass(slots=True)
class VerifyGroup:
    """Speculative verification chunks of one length ``q_len`` (the last token and its drafts), attended like the
    decodes: one gather of their blocks and one batched attention per layer, not one call per chunk."""

    token_index: torch.Tensor  # [B * q_len]: flat token of each (chunk, position)
    gather_rows: torch.Tensor  # [num_layers, 2 * kv_heads * B * max_blocks], (K/V, head, seq, block)
    mask: torch.Tensor  # [1, B, 1, q_len, max_blocks * block_size]: True where attended
    num_seqs: int
    q_len: int


@dataclass(slots=True)
class FreshPrefillBatch:
    """Prefill chunks that attend only to themselves, padded to ``[n, S]`` (S: the longest) for one attention call.

    NOTE: on a GPU one call per chunk and layer is launch-bound (256 short prompts ran at half transformers' batched
    speed on an H100); on the CPU the per-chunk loop is kept, where padding would cost real compute.
    """

    token_index: torch.Tensor  # [n, S] flat token of each (chunk, position); padding repeats the chunk's first token
    valid: torch.Tensor  # [n, S] True for real tokens
    mask: torch.Tensor  # [n, 1, S, S] causal (and in the window) within the chunk; a padded row still sees its start

    def map_tensors(self, fn: TensorFn) -> None:
        self.token_index, self.valid, self.mask = fn(self.token_index), fn(self.valid), fn(self.mask)


@dataclass(slots=True)
class PagedReads:
    """What the layers of one attention window (``None``: full attention) read from the cache in one step."""

    window: int | None = None
    decode_gather_rows: torch.Tensor | None = None  # [num_layers, 2 * kv_heads * Bd * max_blocks], (K/V, head, seq, block)
    decode_mask: torch.Tensor | None = None  # [1, Bd, 1, 1, max_blocks * block_size] True where attended
    verify: list[VerifyGroup] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)
    # GPU only: the prefill chunks without a cached prefix, attended as one padded batch (see FreshPrefillBatch).
    fresh_batch: FreshPrefillBatch | None = None

    def map_tensors(self, fn: TensorFn) -> None:
        """Replace every index tensor with ``fn(tensor)`` (e.g. a copy on the model's device), in place."""
        if self.decode_gather_rows is not None:
            self.decode_gather_rows = fn(self.decode_gather_rows)
        if self.decode_mask is not None:
            self.decode_mask = fn(self.decode_mask)
        for grp in self.verify:
            grp.token_index, grp.gather_rows, grp.mask = fn(grp.token_index), fn(grp.gather_rows), fn(grp.mask)
        for seq in self.prefills:
            if seq.gather_rows is not None:
                seq.gather_rows = fn(seq.gather_rows)
        if self.fresh_batch is not None:
            self.fresh_batch.map_tensors(fn)


@dataclass(slots=True)
class AttentionMetadata:
    """How this step's flat tokens map onto the paged KV cache (indices per layer, built once per step).

    Indices address the block-major buffer of ``core/kv_layout.py`` viewed as ``[rows, block_size * head_dim]``
    (rows) or ``[rows * block_size, head_dim]`` (token vectors). The first ``num_decode`` flat tokens are
    single-token decodes; ``reads`` holds, per attention window the model's layers use, what those layers read.
    """

    write_index: torch.Tensor  # [num_layers, 2 * kv_heads * T]: where each new K/V vector goes, (K/V, head, token) order
    num_decode: int = 0
    reads: dict[int | None, PagedReads] = field(default_factory=dict)

    def for_window(self, window: int | None) -> PagedReads:
        """The reads of layers with this sliding window (``None``: full attention)."""
        try:
            return self.reads[window]
        except KeyError:
            raise KeyError(f"no attention reads were prepared for window {window!r}") from None

    def map_tensors(self, fn: TensorFn) -> None:
        """Replace every index tensor with ``fn(tensor)`` (e.g. a copy on the model's device), in place."""
        self.write_index = fn(self.write_index)
        for reads in self.reads.values():
            reads.map_tensors(fn)
