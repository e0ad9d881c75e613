"""NIXL READs of paged KV blocks between two real processes (UCX over 127.0.0.1)."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
from kv_owner import TORCH_DTYPES, seeded_kv
from kv_peers import OwnerProcess
from prometheus_client import CollectorRegistry

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer import nixl_transport
from tandem.kvtransfer.errors import KVIncompatibleError, KVTransferError, KVTransferUnavailable
from tandem.kvtransfer.handshake import KVCompatibility, RemotePeerCache
from tandem.kvtransfer.metrics import KVTransferMetrics
from tandem.kvtransfer.blocks import coalesce_runs
from tandem.kvtransfer.nixl_transport import NixlKVTransport
from tandem.ports import free_port

MODEL = "tiny-test-model"  # what kv_owner.py advertises
DEAD_PEER_TIMEOUT_S = 5.0


def owner_layout(dtype: str) -> KVCacheLayout:
    return KVCacheLayout(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=32, dtype=dtype)


def create_decode(
    dtype: str = "bfloat16", mode: str = "exact", num_blocks: int = 48, metrics=None, ucx_tls: str | None = None,
    progress_thread: bool = False,
) -> NixlKVTransport:
    """A decode-side transport with a zeroed cache of a different size than the owner's (64 blocks)."""
    layout = KVCacheLayout(4, num_blocks, 16, 2, 32, dtype)
    buffer = torch.zeros(layout.shape, dtype=TORCH_DTYPES[dtype])
    name = f"decode-{dtype}-{mode}-{random.getrandbits(32):08x}"
    # Like the decode worker's: a pure reader runs no NIXL progress thread; its own polls progress it.
    return NixlKVTransport(buffer, layout, name, ucx_tls, descriptor_mode=mode, metrics=metrics,
                           progress_thread=progress_thread)


def create_cache(transport: NixlKVTransport, metrics=None) -> RemotePeerCache:
    return RemotePeerCache(transport, KVCompatibility.from_layout(MODEL, transport.layout), timeout_s=10.0, metrics=metrics)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def local_kv(transport: NixlKVTransport) -> torch.Tensor:
    return transport._buffer


def block_mapping(seed: int) -> tuple[list[int], list[int]]:
    """A contiguous run of 8 (remote 20..27 -> local 30..37) plus 10 scattered blocks, in random order."""
    rng = random.Random(seed)
    remote_pool = [b for b in range(64) if not 20 <= b < 28]
    local_pool = [b for b in range(48) if not 30 <= b < 38]
    remote = list(range(20, 28)) + rng.sample(remote_pool, 10)
    local = list(range(30, 38)) + rng.sample(local_pool, 10)
    return remote, local


def test_coalesce_runs_needs_both_sides_consecutive():
    starts_r, starts_l, lengths = coalesce_runs([4, 5, 6, 9, 10, 11, 12], [0, 1, 2, 3, 7, 8, 9])
    assert (starts_r, starts_l, lengths) == ([4, 9, 10], [0, 3, 7], [3, 1, 3])
    assert coalesce_runs([7], [2]) == ([7], [2], [1])
    with pytest.raises(ValueError, match="equally long"):
        coalesce_runs([1, 2], [1])


def test_missing_nixl_names_the_package(monkeypatch):
    monkeypatch.setattr(nixl_transport, "NIXL_MODULES", ("no_such_nixl._api",))
    with pytest.raises(KVTransferUnavailable, match=r"pip install nixl-cu13==1\.5\.1"):
        nixl_transport.load_nixl()


def test_ucx_settings_turn_on_get_over_cuda_ipc_for_gpu_caches_only(monkeypatch):
    monkeypatch.delenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", raising=False)
    assert nixl_transport.ucx_settings(None, "cpu") == {}
    assert nixl_transport.ucx_settings("tcp,cma", "cpu") == {"UCX_TLS": "tcp,cma"}
    assert nixl_transport.ucx_settings(None, "cuda") == {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}
    monkeypatch.setenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "n")  # an operator's own choice wins
    assert nixl_transport.ucx_settings("tcp", "cuda") == {"UCX_TLS": "tcp"}


def test_ucx_env_sets_variables_only_while_the_backend_is_created(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.delenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", raising=False)
    with nixl_transport._ucx_env({"UCX_TLS": "cma", "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}):
        assert (os.environ["UCX_TLS"], os.environ["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"]) == ("cma", "y")
    assert os.environ["UCX_TLS"] == "tcp"
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in os.environ


@pytest.mark.parametrize(("owner_fixture", "mode", "progress_thread"), [
    ("bf16_owner", "prepped", False), ("bf16_owner", "exact", False), ("fp32_owner", "prepped", False),
    ("fp32_owner", "exact", False), ("bf16_owner", "exact", True),
])
def test_read_scattered_and_contiguous_blocks_bytes_match(request, owner_fixture, mode, progress_thread):
    owner: OwnerProcess = request.getfixturevalue(owner_fixture)
    expected = seeded_kv(owner_layout(owner.dtype), owner.seed)
    remote_ids, local_ids = block_mapping(seed=len(mode) + len(owner.dtype))
    with create_decode(owner.dtype, mode, progress_thread=progress_thread) as decode:
        peer = create_cache(decode).get("127.0.0.1", owner.port, owner.engine_id)
        assert peer.agent_name == owner.agent_name
        handle = decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, remote_ids, local_ids, timeout_s=10.0)
        assert handle.state == "done"
        assert handle.num_blocks == 18
        assert handle.num_bytes == 18 * decode.layout.bytes_per_block_all_layers
        # The 8-block run is one region (block-major layout: every layer of a block is contiguous); the 10
        # scattered blocks are one each.
        assert handle.num_descriptors == 1 + 10
        # NIXL timed the READ itself (post -> completion): inside the span this process saw, never zero.
        assert handle.transfer_s is not None and handle.duration_s is not None
        assert 0 < handle.transfer_s <= handle.duration_s
        got = local_kv(decode)
        for remote, local in zip(remote_ids, local_ids, strict=True):
            assert torch.equal(as_bytes(got[local]), as_bytes(expected[remote])), (remote, local)
        untouched = sorted(set(range(48)) - set(local_ids))
        assert not as_bytes(got[untouched]).any()
        assert decode.num_live_transfers == 0


def test_owner_receives_completion_notification(bf16_owner):
    with create_decode("bfloat16") as decode:
        peer = create_cache(decode).get("127.0.0.1", bf16_owner.port)
        handle = decode.start_read(peer.agent_name, peer.base_address, peer.layout, [1, 2, 3], [5, 6, 7], notif=b"done:req-42")
        try:
            decode.wait(handle, timeout_s=10.0)
        finally:
            decode.release(handle)
        deadline = time.monotonic() + 10.0
        while True:
            notifs = bf16_owner.command("notifs")["notifs"]
            if [decode.agent_name, "done:req-42"] in notifs or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [decode.agent_name, "done:req-42"] in notifs


def test_incompatible_peer_is_refused_naming_the_field(fp32_owner):
    with create_decode("bfloat16") as decode:
        with pytest.raises(KVIncompatibleError) as info:
            create_cache(decode).get("127.0.0.1", fp32_owner.port)
        message = str(info.value)
        assert "dtype: local='bfloat16' remote='float32'" in message
        assert "block_size" not in message  # only differing fields are named
        assert decode.remote_agents == frozenset()  # the peer was never loaded into NIXL


def test_handshake_happens_once_per_engine_and_rejects_a_stale_engine_id(bf16_owner):
    with create_decode("bfloat16") as decode:
        cache = create_cache(decode)
        peer = cache.get("127.0.0.1", bf16_owner.port)
        assert cache.get("127.0.0.1", bf16_owner.port, bf16_owner.engine_id) is peer
        assert cache.get("127.0.0.1", bf16_owner.port) is peer
        assert decode.remote_agents == {bf16_owner.agent_name}
        with pytest.raises(KVTransferError, match="restarted"):
            cache.get("127.0.0.1", bf16_owner.port, engine_id="an-engine-that-no-longer-exists")


def test_killed_peer_fails_within_timeout_and_restart_replaces_its_agent():
    registry = CollectorRegistry()
    metrics = KVTransferMetrics(registry, MODEL, "decode")
    labels = {"role": "decode", "model_name": MODEL}
    port = free_port()
    first = OwnerProcess("bfloat16", seed=33, port=port)
    try:
        with create_decode("bfloat16", metrics=metrics) as decode:
            cache = create_cache(decode, metrics)
            peer = cache.get("127.0.0.1", port, first.engine_id)
            handle = decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, [0, 1], [0, 1], timeout_s=10.0)
            assert registry.get_sample_value("tandem:kv_transfer_bytes_total", labels) == 2 * decode.layout.bytes_per_block_all_layers
            assert registry.get_sample_value("tandem:kv_transfer_blocks_total", labels) == 2
            # The duration histogram holds NIXL's timing, the wall histogram this process's (which includes it).
            duration = registry.get_sample_value("tandem:kv_transfer_duration_seconds_sum", labels)
            wall = registry.get_sample_value("tandem:kv_transfer_wall_seconds_sum", labels)
            assert duration == pytest.approx(handle.transfer_s)
            assert wall == pytest.approx(handle.duration_s)
            assert 0 < duration <= wall

            first.kill()
            started = time.monotonic()
            with pytest.raises(KVTransferError):
                decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, list(range(10)), list(range(10)), timeout_s=DEAD_PEER_TIMEOUT_S)
            assert time.monotonic() - started < DEAD_PEER_TIMEOUT_S
            assert decode.num_live_transfers == 0
            failures = sum(
                registry.get_sample_value("tandem:kv_transfer_failures_total", {**labels, "reason": reason}) or 0
                for reason in ("peer_error", "post_error", "timeout")
            )
            assert failures == 1

            # The engine comes back on the same port with a new engine id: the old agent is dropped.
            second = OwnerProcess("bfloat16", seed=44, port=port)
            try:
                peer2 = cache.get("127.0.0.1", port, second.engine_id)
                assert decode.remote_agents == {second.agent_name}
                decode.read_blocks(peer2.agent_name, peer2.base_address, peer2.layout, [5, 6, 7], [10, 11, 12], timeout_s=10.0)
                expected = seeded_kv(owner_layout("bfloat16"), 44)
                assert torch.equal(as_bytes(local_kv(decode)[10:13]), as_bytes(expected[5:8]))
                assert second.stop() == 0
            finally:
                second.ensure_dead()
    finally:
        first.ensure_dead()


def test_peer_killed_before_first_read_fails_within_timeout():
    owner = OwnerProcess("bfloat16", seed=55)
    try:
        with create_decode("bfloat16", mode="exact") as decode:
            cache = create_cache(decode)
            peer = cache.get("127.0.0.1", owner.port, owner.engine_id)
            owner.kill()
            started = time.monotonic()
            with pytest.raises(KVTransferError):
                handle = decode.start_read(peer.agent_name, peer.base_address, peer.layout, [0, 1, 2], [3, 4, 5])
                try:
                    decode.wait(handle, DEAD_PEER_TIMEOUT_S)
                finally:
                    decode.release(handle)
            assert time.monotonic() - started < DEAD_PEER_TIMEOUT_S
            assert decode.num_live_transfers == 0
            # The dead engine's handshake port refuses at once; the cache drops the peer on request.
            cache.forget(owner.engine_id)
            assert decode.remote_agents == frozenset()
            with pytest.raises(KVTransferError, match="handshake"):
                cache.get("127.0.0.1", owner.port)
    finally:
        owner.ensure_dead()


def test_hung_peer_times_out_releases_the_request_and_the_transport_recovers():
    # Over TCP alone a READ needs the owner's progress, so a stopped owner stalls it (over CMA it would not).
    owner = OwnerProcess("bfloat16", seed=66, ucx_tls="tcp")
    try:
        with create_decode("bfloat16", ucx_tls="tcp") as decode:
            peer = create_cache(decode).get("127.0.0.1", owner.port, owner.engine_id)
            decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, [0], [0], timeout_s=10.0)
            owner.pause()
            handle = decode.start_read(peer.agent_name, peer.base_address, peer.layout, list(range(40)), list(range(40)))
            started = time.monotonic()
            with pytest.raises(KVTransferError) as info:
                decode.wait(handle, timeout_s=1.0)
            assert info.value.reason == "timeout"
            assert 1.0 <= time.monotonic() - started < 5.0
            decode.release(handle)  # cancels the active READ
            assert decode.num_live_transfers == 0
            assert decode._unreleasable == []  # NIXL accepted the release: nothing kept for close()
            owner.resume()
            decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, [1, 2], [1, 2], timeout_s=10.0)
            expected = seeded_kv(owner_layout("bfloat16"), 66)
            assert torch.equal(as_bytes(local_kv(decode)[1:3]), as_bytes(expected[1:3]))
        assert owner.stop() == 0
    finally:
        owner.ensure_dead()


def test_bad_requests_are_refused_and_close_is_idempotent():
    decode = create_decode("bfloat16")
    layout = decode.layout
    with pytest.raises(ValueError, match="equally long"):
        decode.start_read("nobody", 0, layout, [1, 2], [1])
    with pytest.raises(ValueError, match="local block ids"):
        decode.start_read("nobody", 0, layout, [1], [48])
    with pytest.raises(ValueError, match="remote block ids"):
        decode.start_read("nobody", 0, layout, [-1], [0])
    with pytest.raises(ValueError, match="head_dim"):
        decode.start_read("nobody", 0, KVCacheLayout(4, 64, 16, 2, 64, "bfloat16"), [1], [1])
    with pytest.raises(KVTransferError, match="unknown remote agent"):
        decode.start_read("nobody", 0, layout, [1], [1])
    with pytest.raises(ValueError, match="shape"):
        NixlKVTransport(torch.zeros(3), layout, "bad")
    decode.close()
    decode.close()
    with pytest.raises(KVTransferError, match="closed"):
        decode.start_read("nobody", 0, layout, [1], [1])
    assert decode.poll_notifications() == []
