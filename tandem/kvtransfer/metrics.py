"""Prometheus metrics of KV transfers, registered into a registry the caller owns (no global state).

Every series carries ``role`` (``prefill`` | ``decode``) and ``model_name``; failures also carry ``reason``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Transfers here range from ~100 us (a few blocks over shared memory) to seconds (long prompts over TCP).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

ROLES = ("prefill", "decode")


class KVTransferMetrics:
    """The five ``tandem:kv_transfer_*`` series of one engine, bound to its role and model name.

    Create one per registry: prometheus_client refuses to register the same metric name twice in a registry.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
        self.model_name = model_name
        self.role = role
        labels = ("role", "model_name")
        self._bytes = Counter(
            "tandem:kv_transfer_bytes", "Bytes of KV cache moved by completed transfers.", labels, registry=registry
        )
        self._blocks = Counter(
            "tandem:kv_transfer_blocks", "KV blocks moved by completed transfers.", labels, registry=registry
        )
        self._duration = Histogram(
            "tandem:kv_transfer_duration_seconds",
            "Time a KV transfer took from its post to its completion, as NIXL measures it (vLLM's transfer time); "
            "on the exporting side, from granting the blocks to the reader's notice.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._wall = Histogram(
            "tandem:kv_transfer_wall_seconds",
            "Time a reader spent on one KV transfer on its own clock: building the NIXL request, the transfer, "
            "and any wait for the GIL around them.",
            labels,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            "tandem:kv_transfer_failures",
            "KV transfers (or handshakes) that failed, by reason.",
            (*labels, "reason"),
            registry=registry,
        )

    def record_transfer(self, num_bytes: int, num_blocks: int, duration_s: float, wall_s: float | None = None) -> None:
        """Count one completed transfer: ``duration_s`` as NIXL timed it, ``wall_s`` as the reader waited for it
        (readers only)."""
        self._bytes.labels(self.role, self.model_name).inc(num_bytes)
        self._blocks.labels(self.role, self.model_name).inc(num_blocks)
        self._duration.labels(self.role, self.model_name).observe(duration_s)
        if wall_s is not None:
            self._wall.labels(self.role, self.model_name).observe(wall_s)

    def record_failure(self, reason: str) -> None:
        """Count one failed transfer or handshake (``reason``: timeout, peer_error, post_error, ...)."""
        self._failures.labels(self.role, self.model_name, reason).inc()
