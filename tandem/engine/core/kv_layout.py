"""Where each block of the paged KV cache lives in memory (torch-free arithmetic).

NOTE: one contiguous buffer ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` holds the
whole cache. Each layer's K (and V) is a contiguous ``[num_blocks, block_size, kv_heads, head_dim]`` view,
which attention reads, and a run of consecutive block ids is one contiguous region per (layer, K/V), which
kvtransfer moves as one descriptor.
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
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Bytes a whole block occupies across every layer, K and V: what a transfer moves per block."""
        return self.block_bytes * 2 * self.num_layers

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * 2 * self.num_layers * self.num_blocks

    def block_offset(self, layer: int, kind: int, block_id: int) -> int:
        """Byte offset of ``block_id`` of (layer, kind: 0 = K, 1 = V) from the buffer's start."""
        return ((layer * 2 + kind) * self.num_blocks + block_id) * self.block_bytes
