"""Attention over the paged KV cache: one interface the models call, with backends chosen at start-up.

- ``metadata``: what a step reads (per attention window), built by the model runner.
- ``paged``: the shared paged-KV plumbing (block tables, slot mapping, KV writes).
- ``backend``: the interface (``AttentionBackend``, ``LayerAttention``) and ``select_backend``.
- ``torch_ref``: the torch reference backend (fallback and test oracle).
"""

from tandem.engine.attention.backend import BACKENDS, AttentionBackend, LayerAttention, select_backend
from tandem.engine.attention.metadata import (
    AttentionMetadata,
    FreshPrefillBatch,
    PagedReads,
    PrefillSeq,
    VerifyGroup,
)
from tandem.engine.attention.paged import PagedKVIndexer, first_key_block, fresh_prefill_batch, window_mask, write_kv
from tandem.engine.attention.torch_ref import TorchReferenceBackend, attend_fresh_batch

__all__ = [
    "BACKENDS", "AttentionBackend", "AttentionMetadata", "FreshPrefillBatch", "LayerAttention", "PagedKVIndexer",
    "PagedReads", "PrefillSeq", "TorchReferenceBackend", "VerifyGroup", "attend_fresh_batch", "first_key_block",
    "fresh_prefill_batch", "select_backend", "window_mask", "write_kv",
]
