"""Tandem's CPU kernels for the decoder layers: fused elementwise ops (``csrc/fused_cpu.cpp``: RMSNorm with the
residual add, rotate-half RoPE in place, ``silu(gate) * up``) and the bf16 linear (``csrc/linear_cpu.cpp``).

Each replaces a chain of small torch ops with one pass in fp32 registers: on a 135M model the chains cost a decode
step about as much as the linears' dispatch, and a prefill step streams activations through memory once per op.
The linear keeps its weight in its own packed blocks; at decode's few rows it streams them at the memory's rate,
where oneDNN's packed linear reached 16-25 GB/s here. Built at start-up (``load()``); the elementwise ops take bf16
and fp32, the linear bf16; the modules keep their torch code for everything else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from tandem.engine.ops.build import OperatorBuildError, build_extension

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("fused_cpu.cpp", "linear_cpu.cpp", "decoder_cpu.cpp", "bind_fused.cpp"))
EXTENSION_NAME = "tandem_fused_cpu"
DTYPES = (torch.bfloat16, torch.float32)


class FusedOps:
    """The loaded kernels, with the conditions under which each applies (CPU, bf16/fp32, contiguous rows)."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.packed_linear = module.packed_linear  # (x [M, K], W packed, n, fp32 bias padded like W | None)

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in DTYPES

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * norm(x)``; with ``residual``: ``residual += x`` in place first, and the sum is normalised."""
        return self.module.rms_norm(x, residual, weight, eps)

    def rope_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate q ``[T, Hq, D]`` and k ``[T, Hk, D]`` in place; cos/sin ``[T, D/2]`` fp32."""
        self.module.rope_(q, k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.module.silu_mul(gate_up)

    def pack_gated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A gate/up weight ``[2I, K]`` (gate rows first) packed for ``packed_linear_silu_mul``."""
        return self.module.pack_gated_weight(weight)

    def packed_linear_silu_mul(self, x: torch.Tensor, packed: torch.Tensor, inter: int) -> torch.Tensor:
        """``silu(x G^T) * (x U^T)`` ``[M, I]`` in one product: bit for bit ``silu_mul`` of the plain linear's output,
        without writing ``[M, 2I]`` to memory and reading it back."""
        return self.module.packed_linear_silu_mul(x, packed, inter)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits.argmax(-1)`` for fp32 or bf16 ``[B, N]`` CPU rows with adjacent columns (same ties, same NaN rule),
        in one pass; bf16 rows are read as they are (no fp32 copy)."""
        return self.module.argmax_rows(logits)

    @staticmethod
    def packs(weight: torch.Tensor) -> bool:
        """Whether ``weight`` [N, K] can take the packed linear (bf16 on CPU, K even)."""
        return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0

    def pack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.module.pack_linear_weight(weight)


def load(verbose: bool = False) -> FusedOps | None:
    """Build or load the kernels (start-up); None, logged, when they cannot be built here."""
    try:
        module = build_extension(EXTENSION_NAME, SOURCES, "CPU fused ops",
                                 verbose or bool(os.environ.get("TANDEM_VERBOSE_BUILD")))
    except OperatorBuildError as exc:
        logger.warning("%s; the layers use their torch ops", exc)
        return None
    return FusedOps(module)
