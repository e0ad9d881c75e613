"""The CPU paged-attention backend: a small C++ operator that reads KV blocks where they lie in the cache.

The operator (``csrc/paged_attention_cpu.cpp``) is built once with ``torch.utils.cpp_extension`` into
``TANDEM_CACHE_DIR/torch_extensions`` (progress logged; later starts load the cached build in well under a second)
and registered as the custom op ``tandem::paged_attention``, opaque to ``torch.compile``. It serves decodes,
speculative verify chunks and short prefill chunks (up to ``OPERATOR_MAX_CHUNK`` tokens) over a cached prefix;
longer chunks, and chunks without a cached prefix, go to the torch reference (SDPA's blocked GEMMs win there).

Build at start-up, never on the request path: ``CpuPagedBackend.create()`` builds (or loads) the operator, and
``select_backend`` falls back to the torch reference, logged, when it cannot be built.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

from tandem.engine.attention.backend import LayerAttention
from tandem.engine.attention.metadata import PrefillSeq
from tandem.engine.attention.torch_ref import TorchReferenceBackend
from tandem.protocol.model_source import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
# NOTE: prefill chunks with a cached prefix longer than this go to the reference (gather + SDPA, blocked GEMMs):
# measured here (bf16, 2 threads) a 256-token chunk over 768 cached tokens took 1.57 s per step through the
# operator vs 0.29 s through the reference, while decodes (one query) ran 1.5x faster through the operator.
# Verify chunks and short chunks (one 16-query tile) stay on the operator.
OPERATOR_MAX_CHUNK = 16
EXTENSION_NAME = "tandem_paged_attention_cpu"


class OperatorBuildError(RuntimeError):
    """The C++ operator could not be built or loaded here (no compiler, no ninja, a compile error)."""


def build_dir() -> Path:
    """Where the built operator is cached: ``<tandem cache>/torch_extensions/<torch version>``."""
    return cache_root() / "torch_extensions" / torch.__version__.replace("+", "_")


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first time, ~1 minute) or load (cached) the C++ operator; raises ``OperatorBuildError``."""
    directory = build_dir()
    started = time.monotonic()
    logger.info("CPU paged attention: building or loading the operator in %s ...", directory)
    from torch.utils import cpp_extension

    try:
        directory.mkdir(parents=True, exist_ok=True)  # a read-only cache is a build failure (fallback), not a crash
        module = cpp_extension.load(
            name=EXTENSION_NAME, sources=[str(SOURCE)], build_directory=str(directory), verbose=verbose,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"], extra_ldflags=["-fopenmp"],
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise OperatorBuildError(f"CPU paged attention operator: {str(exc).strip().splitlines()[-1]}") from exc
    logger.info("CPU paged attention: operator ready in %.1fs", time.monotonic() - started)
    return module


def register_op(module: ModuleType) -> None:
    """Register ``tandem::paged_attention`` over ``module`` (once per process; later calls keep the first)."""
    if hasattr(torch.ops.tandem, "paged_attention"):
        return

    @torch.library.custom_op("tandem::paged_attention", mutates_args=())
    def paged_attention(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                        scale: float, softcap: float | None, num_kv_heads: int) -> torch.Tensor:
        return module.paged_attention(q, kv_rows, rows, mask, scale, softcap is not None, softcap or 0.0,
                                      num_kv_heads)

    @paged_attention.register_fake
    def _(q, kv_rows, rows, mask, scale, softcap, num_kv_heads):  # noqa: ANN001, ANN202 (shape only)
        return torch.empty_like(q)


def paged_attention(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                    spec: LayerAttention) -> torch.Tensor:
    """``q`` ``[B, Q, H, D]`` over each sequence's blocks, read in place: ``rows`` ``[2 * kvh * B * nb]`` in
    (K/V, head, seq, block) order, ``mask`` broadcastable from ``[1, B, 1, Q, L]`` (the reference's shape)."""
    B, Q = q.shape[0], q.shape[1]
    return torch.ops.tandem.paged_attention(q.contiguous(), kv_rows, rows, mask.reshape(B, Q, -1).contiguous(),
                                            spec.scale, spec.softcap, spec.num_kv_heads)


class CpuPagedBackend(TorchReferenceBackend):
    """Attention through the C++ operator for decodes, verify chunks and short chunks over a cached prefix; the
    torch reference for longer prefill chunks (see ``OPERATOR_MAX_CHUNK``). NOTE: the step's structure (KV
    writes, decodes, verify groups, prefill chunks) is the reference's; only the kernels differ."""

    name = "cpu-paged"

    @classmethod
    def create(cls, verbose: bool = False) -> CpuPagedBackend:
        """Build or load the operator now (start-up), register the custom op, return the backend."""
        register_op(load_extension(verbose=verbose or bool(os.environ.get("TANDEM_VERBOSE_BUILD"))))
        return cls()

    def paged(self, q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
              spec: LayerAttention) -> torch.Tensor:
        return paged_attention(q, kv_rows, rows, mask, spec)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor, seq: PrefillSeq,
                 spec: LayerAttention) -> torch.Tensor:
        if seq.gather_rows is None or seq.q_len > OPERATOR_MAX_CHUNK:
            return super()._prefill(q, k, v, kv_rows, seq, spec)
        chunk = slice(seq.q_start, seq.q_start + seq.q_len)
        D = q.shape[2]
        o = paged_attention(q[chunk].unsqueeze(0), kv_rows, seq.gather_rows[spec.layer],
                            prefix_mask(seq, spec.window, kv_rows.shape[1] // D), spec)
        return o[0]


def prefix_mask(seq: PrefillSeq, window: int | None, block_size: int) -> torch.Tensor:
    """``[1, q_len, nb * block_size]``: which gathered keys (from ``kv_start``) each query of a chunk with a cached
    prefix may attend (causal, and inside the window)."""
    from tandem.engine.attention.paged import window_mask

    num_blocks = -(-(seq.ctx_len - seq.kv_start) // block_size)  # the blocks ``gather_rows`` covers
    kpos = seq.kv_start + torch.arange(num_blocks * block_size).unsqueeze(0)
    qpos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len).unsqueeze(1)
    return window_mask(kpos, qpos, window).unsqueeze(0)
