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


BACKENDS = ("torch", "cpu-paged")


def select_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The attention backend for ``device`` (``name``: one of ``BACKENDS``, or None / "auto"); logged once at start-up.

    Auto: on CPU the C++ paged operator (``cpu_paged.py``; built once and cached, at start-up), falling back to the
    torch reference, with the reason logged, when it cannot be built; elsewhere the torch reference. Asking for
    ``cpu-paged`` explicitly makes a failed build an error.
    """
    from tandem.engine.attention.torch_ref import TorchReferenceBackend

    chosen = None if name in (None, "auto") else name
    if chosen is not None and chosen not in BACKENDS:
        raise ValueError(f"attention backend: unknown {chosen!r}; known: auto, {', '.join(BACKENDS)}")
    if chosen == "cpu-paged" and device.type != "cpu":
        raise ValueError(f"attention backend: cpu-paged runs on the CPU, not on {device}")
    backend: AttentionBackend = TorchReferenceBackend()
    if chosen == "cpu-paged" or (chosen is None and device.type == "cpu"):
        from tandem.engine.attention.cpu_paged import CpuPagedBackend
        from tandem.engine.ops.build import OperatorBuildError

        try:
            backend = CpuPagedBackend.create()
        except OperatorBuildError as exc:
            if chosen is not None:
                raise ValueError(f"attention backend: {exc}") from exc
            logger.warning("attention backend: %s; using the torch reference", exc)
    logger.info("attention backend: %s on %s", backend.name, device)
    return backend
