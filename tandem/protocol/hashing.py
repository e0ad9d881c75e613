"""The one block hasher, shared by the engine's prefix cache and the router's prefix index.

NOTE: this module is deliberately torch-free and dependency-free: the router imports it, so that
routing and caching agree on what a block is. A block's hash chains its parent's hash, its tokens
and optional extra keys (LoRA id, multimodal hashes), so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The chain starts from a fixed seed so that hashes are stable across processes and restarts
# (Python's built-in hash() is salted per process and would break the router's index).
_ROOT_SEED = b"tandem-block-hash-v1"


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra_keys: tuple | None = None) -> int:
    """Hash one full block: (parent hash, its token ids, extra keys) -> a 64-bit unsigned int."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_ROOT_SEED if parent_hash is None else parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return int.from_bytes(h.digest(), "little")


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple | None = None,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent_hash)
    return hashes
