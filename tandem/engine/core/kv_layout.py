"""Where each block of the paged KV cache lives in memory (torch-free arithmetic).

NOTE: one contiguous buffer ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`` holds the whole
cache, block-major: everything a block holds (every layer, K and V, every KV head) is one contiguous span of
``bytes_per_block_all_layers``, so a run of consecutive block ids is one contiguous region, which kvtransfer
moves as one descriptor (UCX's ``cma`` pays a system call per descriptor, ~2.6 us each here).

Attention reads the cache by "rows": a row is one (block, layer, K/V, KV head) slice ``[block_size, head_dim]``,
contiguous, at row index ``((block * num_layers + layer) * 2 + kind) * num_kv_heads + head`` of the buffer
viewed as ``[num_blocks * rows_per_block, block_size * head_dim]``. One ``index_select`` of a batch's rows in
(kind, head, sequence, block) order yields K and V as ``[2, kv_heads, batch, tokens, head_dim]``, which batched
attention reads with no further copy. Measured against a head-major layout (each head's blocks contiguous per
layer) on this machine, that gather costs the same (0.89-1.05x, batch 8-64, consecutive and scattered ids).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class KVCacheLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16" | "float16" | "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"dtype: unsupported KV cache dtype {self.dtype!r}")
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_blocks, self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def rows_per_block(self) -> int:
        """[block_size, head_dim] rows in one block: one per (layer, K/V, KV head)."""
        return self.num_layers * 2 * self.num_kv_heads

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one layer, K or V, one KV head of one block)."""
        return self.block_size * self.head_dim * self.element_size

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Bytes a whole block occupies (every layer, K and V, every head): what a transfer moves per block."""
        return self.row_bytes * self.rows_per_block

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block_all_layers * self.num_blocks

    def row_index(self, block_id: int, layer: int, kind: int, head: int = 0) -> int:
        """Row of (``block_id``, ``layer``, ``kind``: 0 = K / 1 = V, ``head``) in the ``[rows, block_size * head_dim]`` view."""
        return ((block_id * self.num_layers + layer) * 2 + kind) * self.num_kv_heads + head

    def block_offset(self, block_id: int) -> int:
        """Byte offset of ``block_id`` (all its layers) from the buffer's start."""
        return block_id * self.bytes_per_block_all_layers
