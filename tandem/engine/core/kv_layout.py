"""Where each block of the paged KV cache lives in memory (torch-free arithmetic).

NOTE: one contiguous buffer ``[num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]`` holds the
whole cache. Each layer's K (and V) is a head-major ``[kv_heads, num_blocks, block_size, head_dim]`` view:
gathering a batch's blocks with one ``index_select`` on dim 1 yields ``[kv_heads, batch, tokens, head_dim]``,
which batched attention reads with no further copy (the cheapest layout to gather on CPU). A "plane" is
one (layer, K/V, head) slice ``[num_blocks, block_size, head_dim]``: a run of consecutive block ids is one
contiguous region per plane, which kvtransfer moves as one descriptor.
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
        return (self.num_layers, 2, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)

    @property
    def num_planes(self) -> int:
        """Independent [num_blocks, block_size, head_dim] slices: one per (layer, K/V, KV head)."""
        return self.num_layers * 2 * self.num_kv_heads

    @property
    def element_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one plane (one layer, K or V, one KV head)."""
        return self.block_size * self.head_dim * self.element_size

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Bytes a whole block occupies across every plane: what a transfer moves per block."""
        return self.block_bytes * self.num_planes

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_planes * self.num_blocks

    def block_offset(self, layer: int, kind: int, block_id: int, head: int = 0) -> int:
        """Byte offset of ``block_id`` in plane (layer, kind: 0 = K / 1 = V, head) from the buffer's start."""
        plane = (layer * 2 + kind) * self.num_kv_heads + head
        return (plane * self.num_blocks + block_id) * self.block_bytes
