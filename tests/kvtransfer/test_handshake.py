"""Compatibility records and the handshake side channel (no NIXL needed)."""

from __future__ import annotations

import socket
import time

import pytest

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.errors import KVIncompatibleError, KVTransferError
from tandem.kvtransfer.handshake import (
    HandshakePayload,
    HandshakeServer,
    KVCompatibility,
    check_compatible,
    fetch_handshake,
)

LAYOUT = KVCacheLayout(num_layers=30, num_blocks=128, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")


def create_payload(engine_id: str = "engine-a") -> HandshakePayload:
    return HandshakePayload(
        engine_id=engine_id,
        agent_name=f"prefill-{engine_id}",
        agent_metadata=bytes(range(256)) * 3,  # arbitrary binary must survive base64 + JSON
        base_address=0x7F00_DEAD_BEEF,
        layout=LAYOUT,
        compat=KVCompatibility.from_layout("SmolLM2-135M-Instruct", LAYOUT),
    )


def test_check_compatible_names_every_differing_field_with_both_values():
    local = KVCompatibility.from_layout("SmolLM2-135M-Instruct", LAYOUT)
    remote = KVCompatibility("SmolLM2-360M-Instruct", "bfloat16", 32, 30, 3, 64, local.kv_layout)
    check_compatible(local, local)
    with pytest.raises(KVIncompatibleError) as info:
        check_compatible(local, remote)
    assert info.value.differences == (
        ("model", "SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct"),
        ("block_size", 16, 32),
    )
    assert "model: local='SmolLM2-135M-Instruct' remote='SmolLM2-360M-Instruct'" in str(info.value)
    assert "block_size: local=16 remote=32" in str(info.value)
    assert info.value.reason == "incompatible"


def test_compat_is_frozen_and_slotted():
    compat = KVCompatibility.from_layout("m", LAYOUT)
    with pytest.raises(AttributeError):
        compat.dtype = "float32"  # type: ignore[misc]
    assert not hasattr(compat, "__dict__")


def test_payload_round_trips_through_the_server():
    calls = []

    def provider() -> HandshakePayload:
        calls.append(1)
        return create_payload()

    with HandshakeServer("127.0.0.1", 0, provider) as server:
        assert server.port > 0
        assert fetch_handshake("127.0.0.1", server.port, timeout_s=5) == create_payload()
        assert fetch_handshake("127.0.0.1", server.port, timeout_s=5) == create_payload()
    assert len(calls) == 2


def test_provider_failure_is_a_clear_error_and_server_keeps_serving():
    state = {"fail": True}

    def provider() -> HandshakePayload:
        if state["fail"]:
            raise RuntimeError("KV cache not allocated yet")
        return create_payload()

    with HandshakeServer("127.0.0.1", 0, provider) as server:
        with pytest.raises(KVTransferError, match="503.*not allocated yet"):
            fetch_handshake("127.0.0.1", server.port, timeout_s=5)
        state["fail"] = False
        assert fetch_handshake("127.0.0.1", server.port, timeout_s=5).engine_id == "engine-a"


def test_malformed_payload_is_refused():
    with pytest.raises(ValueError, match="version"):
        HandshakePayload.from_json(b'{"version": 99}')
    with pytest.raises(ValueError, match="malformed"):
        HandshakePayload.from_json(b"not json")


def test_unreachable_peer_fails_fast():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(KVTransferError, match="handshake") as info:
        fetch_handshake("127.0.0.1", port, timeout_s=5)
    assert info.value.reason == "handshake"


def test_silent_peer_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection at the kernel level, never answers
    try:
        started = time.monotonic()
        with pytest.raises(KVTransferError, match="timed out"):
            fetch_handshake("127.0.0.1", listener.getsockname()[1], timeout_s=0.5)
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_close_twice_frees_the_port():
    server = HandshakeServer("127.0.0.1", 0, create_payload)
    port = server.port
    server.close()
    server.close()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
