"""The CPU paged-attention backend: small C++ operators that read KV blocks where they lie in the cache.

The operators (``csrc/paged_attention_cpu.cpp``, ``csrc/prefill_attention_cpu.cpp``) are built once with
``torch.utils.cpp_extension`` into ``TANDEM_CACHE_DIR/torch_extensions`` (progress logged; later starts load the cached
build in well under a second) and registered as custom ops (``tandem::paged_attention``, ``tandem::prefill_dense``,
``tandem::prefill_paged``), opaque to ``torch.compile``.

Which kernel attends what:
- decodes, speculative verify chunks and chunks of up to ``OPERATOR_MAX_CHUNK`` tokens over a cached prefix: the
  paged operator (fp32 arithmetic, one work item per sequence, KV head and 16-query tile);
- longer prefill chunks, in bf16 on cores with AVX-512 bf16: the prefill kernels (``vdpbf16ps`` tiles, online
  softmax): every chunk without a cached prefix of the step in one call, each chunk after a cached prefix over its
  blocks in place;
- anything else (other dtypes, head sizes not a multiple of 64, no AVX-512 bf16): the torch reference.

Build at start-up, never on the request path: ``CpuPagedBackend.create()`` builds (or loads) the operators, and
``select_backend`` falls back to the torch reference, logged, when they cannot be built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from tandem.engine.attention.backend import LayerAttention
from tandem.engine.attention.metadata import PrefillSeq
from tandem.engine.attention.torch_ref import TorchReferenceBackend
from tandem.engine.ops.build import build_extension

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
PREFILL_SOURCE = Path(__file__).parent / "csrc" / "prefill_attention_cpu.cpp"
STORE_SOURCE = Path(__file__).parent / "csrc" / "kv_store_cpu.cpp"
BIND_SOURCE = Path(__file__).parent / "csrc" / "bind_attention.cpp"
# NOTE: chunks over a cached prefix longer than this leave the paged operator (one 16-query tile: its fp32 scores
# are per key, not tiled): measured here (bf16, 2 threads) a 256-token chunk over 768 cached tokens took 1.57 s per
# step through it vs 0.29 s through the reference (gather + SDPA). In bf16 they go to the prefill kernel instead.
OPERATOR_MAX_CHUNK = 16
EXTENSION_NAME = "tandem_paged_attention_cpu"
# NOTE: eager steps call the extension directly: the custom op's dispatch cost ~10 us a call, and a one-stream step
# makes 30 of them (~3% of it). Graphs being compiled go through the registered ops, which inductor keeps opaque.
_extension: ModuleType | None = None


def _eager() -> ModuleType | None:
    return None if torch.compiler.is_compiling() else _extension


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first time, ~25 s) or load (cached) the C++ operators; raises ``OperatorBuildError``."""
    sources = [SOURCE, PREFILL_SOURCE, STORE_SOURCE, BIND_SOURCE]
    return build_extension(EXTENSION_NAME, sources, "CPU paged attention", verbose)


def register_op(module: ModuleType) -> None:
    """Register ``tandem::paged_attention`` over ``module`` (once per process; later calls keep the first)."""
    global _extension
    if hasattr(torch.ops.tandem, "paged_attention"):
        return
    _extension = module

    @torch.library.custom_op("tandem::paged_attention", mutates_args=())
    def paged_attention(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                        scale: float, softcap: float | None, num_kv_heads: int) -> torch.Tensor:
        return module.paged_attention(q, kv_rows, rows, mask, scale, softcap is not None, softcap or 0.0,
                                      num_kv_heads)

    @paged_attention.register_fake
    def _(q, kv_rows, rows, mask, scale, softcap, num_kv_heads):  # noqa: ANN001, ANN202 (shape only)
        return torch.empty_like(q)

    @torch.library.custom_op("tandem::prefill_dense", mutates_args=())
    def prefill_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                      scale: float, window: int, softcap: float | None) -> torch.Tensor:
        return module.prefill_attention_dense(q, k, v, starts, lens, scale, window, softcap is not None, softcap or 0.0)

    @prefill_dense.register_fake
    def _(q, k, v, starts, lens, scale, window, softcap):  # noqa: ANN001, ANN202 (shape only)
        return torch.empty_like(q)

    @torch.library.custom_op("tandem::prefill_paged", mutates_args=())
    def prefill_paged(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, kv_start: int, ctx_len: int,
                      scale: float, window: int, softcap: float | None, num_kv_heads: int) -> torch.Tensor:
        return module.prefill_attention_paged(q, kv_rows, rows, kv_start, ctx_len, scale, window, softcap is not None,
                                              softcap or 0.0, num_kv_heads)

    @prefill_paged.register_fake
    def _(q, kv_rows, rows, kv_start, ctx_len, scale, window, softcap, num_kv_heads):  # noqa: ANN001, ANN202
        return torch.empty_like(q)


def paged_attention(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                    spec: LayerAttention) -> torch.Tensor:
    """``q`` ``[B, Q, H, D]`` over each sequence's blocks, read in place: ``rows`` ``[2 * kvh * B * nb]`` in
    (K/V, head, seq, block) order, ``mask`` broadcastable from ``[1, B, 1, Q, L]`` (the reference's shape)."""
    B, Q = q.shape[0], q.shape[1]
    q, mask = q.contiguous(), mask.reshape(B, Q, -1).contiguous()
    if (ext := _eager()) is not None:
        return ext.paged_attention(q, kv_rows, rows, mask, spec.scale, spec.softcap is not None, spec.softcap or 0.0,
                                   spec.num_kv_heads)
    return torch.ops.tandem.paged_attention(q, kv_rows, rows, mask, spec.scale, spec.softcap, spec.num_kv_heads)


class CpuPagedBackend(TorchReferenceBackend):
    """Attention through the C++ operator for decodes, verify chunks and short chunks over a cached prefix; the
    torch reference for longer prefill chunks (see ``OPERATOR_MAX_CHUNK``). NOTE: the step's structure (KV
    writes, decodes, verify groups, prefill chunks) is the reference's; only the kernels differ."""

    name = "cpu-paged"

    def __init__(self, bf16_prefill: bool = False) -> None:
        self.bf16_prefill = bf16_prefill  # the build has the AVX-512 bf16 prefill kernels

    @classmethod
    def create(cls, verbose: bool = False) -> CpuPagedBackend:
        """Build or load the operators now (start-up), register the custom ops, return the backend."""
        module = load_extension(verbose=verbose or bool(os.environ.get("TANDEM_VERBOSE_BUILD")))
        register_op(module)
        bf16_prefill = bool(module.bf16_prefill_available())
        logger.info("CPU paged attention: bf16 prefill kernels %s", ("on, on AMX tiles" if module.attention_amx()
                    else "on (AVX-512)") if bf16_prefill else
                    "off (no AVX-512 bf16 at build time): long bf16 chunks use the torch reference")
        return cls(bf16_prefill)

    @staticmethod
    def decode_kernels() -> object | None:
        """store_kv and paged_attention as a capsule of function pointers, for a model's native decoder stack
        (``ops/csrc/decoder_cpu.cpp``); None before the operators are loaded."""
        return None if _extension is None else _extension.decode_attention_kernels()

    def write_kv(self, kv_rows: torch.Tensor, write_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        ext = _eager()
        if ext is None or k.stride(-1) != 1 or k.dtype != kv_rows.dtype or k.stride(1) != k.shape[2]:
            super().write_kv(kv_rows, write_index, k, v)
            return
        ext.store_kv(kv_rows, write_index, k, v)

    def attend_prefills(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor,
                        prefills: list[PrefillSeq], spec: LayerAttention, out: torch.Tensor) -> None:
        if not (self.bf16_prefill and q.dtype == torch.bfloat16 and spec.head_dim % 64 == 0 and spec.head_dim <= 256):
            super().attend_prefills(q, k, v, kv_rows, prefills, spec, out)
            return
        window = spec.window or 0
        fresh = [seq for seq in prefills if seq.gather_rows is None]
        if fresh:  # every chunk without a cached prefix in one call
            starts = torch.tensor([seq.q_start for seq in fresh], dtype=torch.long)
            lens = torch.tensor([seq.q_len for seq in fresh], dtype=torch.long)
            if (ext := _eager()) is not None:  # q, k, v as the projection left them; into out's rows
                ext.prefill_attention_dense_into(_token_rows(q), _token_rows(k), _token_rows(v), starts, lens,
                                                 spec.scale, window, spec.softcap is not None, spec.softcap or 0.0,
                                                 out)
            else:
                o = torch.ops.tandem.prefill_dense(q.contiguous(), k.contiguous(), v.contiguous(), starts, lens,
                                                   spec.scale, window, spec.softcap)
                for seq in fresh:
                    out[seq.q_start : seq.q_start + seq.q_len] = o[seq.q_start : seq.q_start + seq.q_len]
        for seq in prefills:
            if seq.gather_rows is None:
                continue
            chunk = slice(seq.q_start, seq.q_start + seq.q_len)
            if seq.q_len <= OPERATOR_MAX_CHUNK:
                out[chunk] = self._prefill(q, k, v, kv_rows, seq, spec)
            else:
                args = (q[chunk].contiguous(), kv_rows, seq.gather_rows[spec.layer], seq.kv_start, seq.ctx_len,
                        spec.scale, window)
                if (ext := _eager()) is not None:
                    out[chunk] = ext.prefill_attention_paged(*args, spec.softcap is not None, spec.softcap or 0.0,
                                                             spec.num_kv_heads)
                else:
                    out[chunk] = torch.ops.tandem.prefill_paged(*args, spec.softcap, spec.num_kv_heads)

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


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, heads, D]`` as the dense prefill kernel reads it: each token's heads side by side, tokens at any
    stride (q, k and v split from one projection row are such views; anything else is copied)."""
    T, heads, D = x.shape
    return x if x.stride(2) == 1 and x.stride(1) == D and x.stride(0) >= heads * D else x.contiguous()


def prefix_mask(seq: PrefillSeq, window: int | None, block_size: int) -> torch.Tensor:
    """``[1, q_len, nb * block_size]``: which gathered keys (from ``kv_start``) each query of a chunk with a cached
    prefix may attend (causal, and inside the window)."""
    from tandem.engine.attention.paged import window_mask

    num_blocks = -(-(seq.ctx_len - seq.kv_start) // block_size)  # the blocks ``gather_rows`` covers
    kpos = seq.kv_start + torch.arange(num_blocks * block_size).unsqueeze(0)
    qpos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len).unsqueeze(1)
    return window_mask(kpos, qpos, window).unsqueeze(0)
