"""KV transfer metrics live in the registry they are given, labelled by role and model."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tandem.kvtransfer.metrics import KVTransferMetrics


def test_metrics_are_labelled_and_isolated_per_registry():
    registry = CollectorRegistry()
    metrics = KVTransferMetrics(registry, "smol", "prefill")
    metrics.record_transfer(num_bytes=4096, num_blocks=2, duration_s=0.003)
    metrics.record_transfer(num_bytes=4096, num_blocks=2, duration_s=0.002, wall_s=0.02)
    metrics.record_failure("timeout")
    labels = {"role": "prefill", "model_name": "smol"}
    assert registry.get_sample_value("tandem:kv_transfer_bytes_total", labels) == 8192
    assert registry.get_sample_value("tandem:kv_transfer_blocks_total", labels) == 4
    assert registry.get_sample_value("tandem:kv_transfer_duration_seconds_count", labels) == 2
    assert registry.get_sample_value("tandem:kv_transfer_duration_seconds_bucket", {**labels, "le": "0.005"}) == 2
    # Only the transfer that came with a wall time (a reader's) is in the wall histogram.
    assert registry.get_sample_value("tandem:kv_transfer_wall_seconds_count", labels) == 1
    assert registry.get_sample_value("tandem:kv_transfer_wall_seconds_bucket", {**labels, "le": "0.01"}) == 0
    assert registry.get_sample_value("tandem:kv_transfer_failures_total", {**labels, "reason": "timeout"}) == 1
    assert b'tandem:kv_transfer_bytes_total{model_name="smol",role="prefill"} 8192.0' in generate_latest(registry)
    # A second registry starts from zero: nothing global.
    other = CollectorRegistry()
    KVTransferMetrics(other, "smol", "decode")
    assert other.get_sample_value("tandem:kv_transfer_bytes_total", labels) is None


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="role"):
        KVTransferMetrics(CollectorRegistry(), "smol", "router")
