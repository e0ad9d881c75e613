"""Leases on prefill blocks awaiting a decode engine's READ (pure logic, injectable clock, thread-safe).

The prefill engine grants a lease when it hands out ``remote_block_ids``; it frees the blocks when the decode
engine confirms (``release``, on the NIXL notification) or when the lease runs out (``expire``), whichever
comes first. Exactly one of the two returns a lease's blocks, so they are freed exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    """Blocks held for one request until ``deadline`` (on the table's clock)."""

    request_id: str
    block_ids: tuple[int, ...]
    deadline: float


class LeaseTable:
    """Request id -> leased blocks.

    Args:
        clock: seconds, monotonic (``time.monotonic`` by default; tests pass a fake).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def grant(self, request_id: str, block_ids: Sequence[int], ttl_s: float) -> Lease:
        """Lease ``block_ids`` to ``request_id`` for ``ttl_s`` seconds.

        Raises:
            ValueError: ``ttl_s`` is not positive, or the request already holds a lease.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be > 0, got {ttl_s}")
        lease = Lease(request_id, tuple(int(b) for b in block_ids), self._clock() + ttl_s)
        with self._lock:
            if request_id in self._leases:
                raise ValueError(f"request_id: {request_id!r} already holds a lease")
            self._leases[request_id] = lease
        return lease

    def release(self, request_id: str) -> tuple[int, ...] | None:
        """The decode side confirmed: drop the lease and return its blocks (None if unknown or expired)."""
        with self._lock:
            lease = self._leases.pop(request_id, None)
        return None if lease is None else lease.block_ids

    def expire(self, now: float | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Drop every lease whose deadline is <= ``now`` (default: the clock) and return them."""
        now = self._clock() if now is None else now
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.deadline <= now]
            for lease in expired:
                del self._leases[lease.request_id]
        return [(lease.request_id, lease.block_ids) for lease in expired]

    def get(self, request_id: str) -> Lease | None:
        """The live lease of a request, if any."""
        with self._lock:
            return self._leases.get(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._leases
