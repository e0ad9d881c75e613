"""The one attention interface models call, and the choice of backend at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from tandem.engine.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """What one layer asks of attention: its shape, its score scale, and the family's variations."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float  # multiplies q.k (head_dim ** -0.5 for most families; Gemma: query_pre_attn_scalar ** -0.5)
    window: int | None = None  # sliding window: a query sees this many keys ending at itself; None = all before it
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) before masking (Gemma 2/3 option)


class AttentionBackend(Protocol):
    """Paged attention over the block-major KV cache, for every kind of query a step holds.

    ``forward`` stores the layer's new keys/values at their slots, then attends every token of the step: decodes,
    speculative verify chunks and prefill chunks (with or without a cached prefix), each only to the keys its
    position and the layer's window allow. Shapes: q ``[T, H, D]``, k/v ``[T, kv_heads, D]``; returns ``[T, H, D]``.
    """

    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor,
                spec: LayerAttention, meta: AttentionMetadata) -> torch.Tensor:
        ...


BACKENDS = ("torch",)


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The attention backend for ``device`` (``name`` forces one of ``BACKENDS``); logged once at start-up.

    NOTE: the torch reference is today's only backend, on CPU and CUDA alike; faster ones (a CPU operator,
    flashinfer on CUDA) plug in here, with the reference as their fallback and test oracle.
    """
    from tandem.engine.attention.torch_ref import TorchReferenceBackend

    chosen = name or "torch"
    if chosen not in BACKENDS:
        raise ValueError(f"attention backend: unknown {chosen!r}; known: {', '.join(BACKENDS)}")
    backend = TorchReferenceBackend()
    logger.info("attention backend: %s on %s", backend.name, device)
    return backend
