"""NIXL READs of paged KV blocks between two processes' GPU memory (VRAM), as two GPU engines would move them.

Skipped where torch sees no CUDA device, as on CI; on a GPU host with NIXL installed:
``python -m pytest tests/kvtransfer/test_nixl_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from kv_owner import seeded_kv
from kv_peers import OwnerProcess
from test_nixl_transport import MODEL, block_mapping, owner_layout

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.handshake import KVCompatibility, RemotePeerCache
from tandem.kvtransfer.nixl_transport import NixlKVTransport

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_owner():
    owner = OwnerProcess("bfloat16", seed=44, device="cuda")
    yield owner
    try:
        assert owner.stop() == 0
    finally:
        owner.ensure_dead()


@pytest.mark.parametrize("mode", ["exact", "prepped"])
def test_read_blocks_from_gpu_to_gpu(cuda_owner, mode):
    layout = KVCacheLayout(4, 48, 16, 2, 32, "bfloat16")
    buffer = torch.zeros(layout.shape, dtype=torch.bfloat16, device="cuda")
    remote_ids, local_ids = block_mapping(seed=7)
    with NixlKVTransport(buffer, layout, f"decode-cuda-{mode}", descriptor_mode=mode, progress_thread=False) as decode:
        peer = RemotePeerCache(decode, KVCompatibility.from_layout(MODEL, layout), timeout_s=10.0).get(
            "127.0.0.1", cuda_owner.port, cuda_owner.engine_id)
        handle = decode.read_blocks(peer.agent_name, peer.base_address, peer.layout, remote_ids, local_ids,
                                    notif=b"done:18:cuda", timeout_s=10.0)
        assert handle.state == "done" and handle.num_descriptors == 1 + 10
        assert handle.transfer_s is not None and 0 < handle.transfer_s <= handle.duration_s
        torch.cuda.synchronize()
        got = buffer.cpu().view(torch.int16)
        expected = seeded_kv(owner_layout("bfloat16"), cuda_owner.seed).view(torch.int16)
        for remote, local in zip(remote_ids, local_ids, strict=True):
            assert torch.equal(got[local], expected[remote]), (remote, local)
        untouched = sorted(set(range(48)) - set(local_ids))
        assert not got[untouched].any()
        assert decode.num_live_transfers == 0
