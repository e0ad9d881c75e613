"""Errors raised by Tandem's KV transfer layer (torch-free, NIXL-free)."""

from __future__ import annotations


class KVTransferUnavailable(RuntimeError):
    """NIXL (or its UCX backend) cannot be loaded or started in this process."""


class KVTransferError(RuntimeError):
    """A KV transfer (or the handshake that precedes it) failed or timed out.

    ``reason`` is a short, stable label (``"timeout"``, ``"peer_error"``, ``"post_error"``, ``"handshake"``,
    ``"closed"``) used as the ``reason`` label of ``tandem:kv_transfer_failures_total``.
    """

    def __init__(self, message: str, reason: str = "peer_error") -> None:
        super().__init__(message)
        self.reason = reason


class KVIncompatibleError(KVTransferError):
    """Two engines' KV caches cannot exchange blocks; ``differences`` lists (field, local, remote)."""

    def __init__(self, differences: list[tuple[str, object, object]]) -> None:
        self.differences = tuple(differences)
        detail = "; ".join(f"{name}: local={local!r} remote={remote!r}" for name, local, remote in differences)
        super().__init__(f"incompatible KV cache with remote engine ({detail})", reason="incompatible")
