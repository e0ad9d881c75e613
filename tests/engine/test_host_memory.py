"""The KV pool's host memory: a huge-page mapping, and the engine's keep-warm pass over the next free blocks."""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.core.block_pool import BlockPool
from tandem.engine.host_memory import HUGE_PAGE_BYTES, allocate_pool, huge_page_bytes, transparent_huge_pages_mode
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.model_runner import PAGE_BYTES
from tandem.engine.sampling_params import SamplingParams


def test_pool_is_aligned_filled_and_outlives_its_other_references():
    pool = allocate_pool((3, 5, 1000), torch.bfloat16, 1.5)
    tensor = pool.tensor
    del pool
    gc.collect()
    assert tensor.shape == (3, 5, 1000) and tensor.dtype == torch.bfloat16
    assert tensor.data_ptr() % HUGE_PAGE_BYTES == 0
    assert bool((tensor == 1.5).all())
    tensor[2, 4, 999] = -3.0  # the last element is inside the mapping, and writable
    assert tensor.view(-1)[-1].item() == -3.0


@pytest.mark.skipif(transparent_huge_pages_mode() not in ("always", "madvise"),
                    reason="this kernel does not offer transparent huge pages")
def test_pool_is_backed_by_huge_pages():
    pool = allocate_pool((64 << 20,), torch.uint8, 1)
    assert pool.huge_pages_requested
    backed = huge_page_bytes(pool.tensor)
    assert backed is not None and backed >= 32 << 20, f"only {backed} bytes of 64 MiB on huge pages"
    ordinary = torch.ones(64 << 20, dtype=torch.uint8)
    assert pool.tensor.data_ptr() != ordinary.data_ptr()


def test_next_free_block_ids_are_the_blocks_allocation_takes_next():
    pool = BlockPool(num_blocks=8, block_size=4)
    held = pool.get_new_blocks(3)
    pool.free_blocks([held[1]])  # an uncached free block goes to the front of the queue
    upcoming = pool.next_free_block_ids(4)
    assert upcoming == [held[1].block_id, 3, 4, 5]
    assert [b.block_id for b in pool.get_new_blocks(4)] == sorted(upcoming)
    assert pool.next_free_block_ids(10) == [6, 7]


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(model="preset:tiny-llama", dtype="float32",
                          cache=CacheConfig(num_blocks=32, block_size=4), scheduler=SchedulerConfig(max_model_len=40))
    return LLMEngine(config, progress=False)


def test_page_offsets_cover_every_page_of_each_block(engine):
    runner = engine.runner
    per_block = runner.layout.bytes_per_block_all_layers
    offsets = runner.page_offsets([5, 2]).tolist()
    pages = -(-per_block // PAGE_BYTES)
    assert len(offsets) == 2 * pages
    for block, chunk in ((5, offsets[:pages]), (2, offsets[pages:])):
        assert chunk[0] == block * per_block
        assert all(b - a == PAGE_BYTES for a, b in zip(chunk, chunk[1:]))
        assert chunk[-1] < (block + 1) * per_block <= chunk[-1] + PAGE_BYTES
    assert max(runner.page_offsets([runner.layout.num_blocks - 1]).tolist()) < runner.layout.total_bytes


def test_keep_warm_touches_the_next_blocks_once_per_interval_and_changes_nothing(engine, monkeypatch):
    touched: list[list[int]] = []
    real_touch = engine.runner.touch_blocks
    monkeypatch.setattr(engine.runner, "touch_blocks", lambda ids: (touched.append(ids), real_touch(ids)))
    monkeypatch.setattr(engine.config.cache, "kv_keep_warm_interval_s", 5.0)
    engine._warmed_at = float("-inf")
    before = engine.runner.kv_buffer.clone()
    assert engine.keep_kv_cache_warm(100.0)
    assert not engine.keep_kv_cache_warm(104.9)
    assert engine.keep_kv_cache_warm(105.0)
    # max_model_len 40 at 4 tokens a block: the 10 blocks the next prompts would be given.
    assert touched == [engine.kv_manager.pool.next_free_block_ids(10)] * 2 and len(touched[0]) == 10
    assert torch.equal(engine.runner.kv_buffer, before)
    monkeypatch.setattr(engine.config.cache, "kv_keep_warm_interval_s", 0.0)
    assert not engine.keep_kv_cache_warm(1000.0)


def test_keep_warm_interval_must_not_be_negative():
    with pytest.raises(ValueError, match="kv_keep_warm_interval_s"):
        CacheConfig(kv_keep_warm_interval_s=-1)


async def test_keep_warm_also_runs_while_the_engine_is_busy():
    # A server that is never idle would otherwise hand its next prompts pages nobody touched for minutes.
    config = EngineConfig(model="preset:tiny-llama", dtype="float32",
                          cache=CacheConfig(num_blocks=64, block_size=4, kv_keep_warm_interval_s=0.001),
                          scheduler=SchedulerConfig(max_model_len=256))
    busy: list[float] = []

    def factory(cfg: EngineConfig) -> LLMEngine:
        engine = LLMEngine(cfg, progress=False)
        real = engine.keep_kv_cache_warm

        def recording(now: float) -> bool:
            touched = real(now)
            if touched and engine.scheduler.has_work():
                busy.append(now)
            return touched

        engine.keep_kv_cache_warm = recording
        return engine

    engine = AsyncEngine(config, factory)
    engine.start()
    try:
        await engine.wait_ready(60)
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        deltas = [d async for d in engine.generate("long", list(range(10, 30)), params)]
        assert sum(len(d.new_token_ids) for d in deltas) == 200
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
    assert len(busy) >= 2
