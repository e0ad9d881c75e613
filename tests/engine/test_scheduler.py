"""Scheduler policy on a small fake KV configuration: the runner is replaced by chosen tokens."""

from helpers import create_request
from tandem.engine.config import SchedulerConfig
from tandem.engine.core.kv_cache_manager import KVCacheManager
from tandem.engine.core.request import RequestStatus
from tandem.engine.core.scheduler import ModelRunnerOutput, Scheduler


def create_scheduler(num_blocks=32, block_size=4, budget=64, max_seqs=16, max_len=256, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len), kv)


def step(sched, token=7):
    """One step: every request that reaches its last known token 'samples' ``token``."""
    out = sched.schedule()
    sampled = {
        s.request.request_id: token
        for s in out.scheduled
        if s.request.num_computed_tokens + s.num_tokens == s.request.num_tokens
    }
    return out, sched.update_from_output(out, ModelRunnerOutput(sampled=sampled))


def run_to_completion(sched, max_steps=500):
    finished = []
    for _ in range(max_steps):
        if not (sched.waiting or sched.running):
            break
        _, updates = step(sched)
        finished += [u.request.request_id for u in updates if u.finished]
    return finished


def assert_no_leaks(sched):
    pool = sched.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not sched.kv.req_to_blocks


def test_chunked_prefill_mixes_with_decodes_under_the_token_budget():
    sched = create_scheduler(budget=10)
    sched.add_request(create_request("short", [1, 2, 3], max_tokens=5))
    step(sched)  # short: prompt done, first token sampled
    sched.add_request(create_request("long", list(range(100, 125)), max_tokens=2))
    out, _ = step(sched)
    chunks = {s.request.request_id: s.num_tokens for s in out.scheduled}
    assert chunks == {"short": 1, "long": 9}  # one decode token + a 9-token prompt chunk = budget 10
    assert out.total_tokens <= 10
    assert set(run_to_completion(sched)) == {"short", "long"}
    assert_no_leaks(sched)


def test_prefix_hit_skips_cached_blocks():
    sched = create_scheduler()
    prompt = list(range(1, 14))
    sched.add_request(create_request("a", prompt, max_tokens=1))
    run_to_completion(sched)
    sched.add_request(create_request("b", prompt, max_tokens=1))
    out, _ = step(sched)
    assert out.scheduled[0].num_tokens == 13 - 12  # three cached blocks of 4, one token left
    assert sched.kv.prefix_stats.hits == 12
    assert_no_leaks(sched)


def test_prefix_miss_computes_everything():
    sched = create_scheduler(caching=False)
    sched.add_request(create_request("a", list(range(1, 14)), max_tokens=1))
    run_to_completion(sched)
    sched.add_request(create_request("b", list(range(1, 14)), max_tokens=1))
    out, _ = step(sched)
    assert out.scheduled[0].num_tokens == 13
    assert_no_leaks(sched)


def test_preemption_under_memory_pressure_recomputes_and_finishes_everything():
    # 8 blocks of 4 tokens = 32 slots; three requests growing to 14 tokens each cannot all fit.
    sched = create_scheduler(num_blocks=8, block_size=4)
    for i in range(3):
        sched.add_request(create_request(f"r{i}", [10 + i] * 6, max_tokens=8))
    finished = run_to_completion(sched)
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert sched.num_preemptions > 0
    assert_no_leaks(sched)


def test_newest_running_request_is_preempted_first():
    sched = create_scheduler(num_blocks=6, block_size=4)
    sched.add_request(create_request("old", [1] * 8, max_tokens=20))
    step(sched)
    sched.add_request(create_request("new", [2] * 8, max_tokens=20))
    preempted = []
    for _ in range(30):
        out, _ = step(sched)
        preempted += out.preempted
        if preempted:
            break
    assert preempted[0] == "new"
    assert sched.requests["new"].status == RequestStatus.PREEMPTED
    sched.finish_requests(["old", "new"], RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


def test_abort_frees_blocks_at_once():
    sched = create_scheduler()
    sched.add_request(create_request("a", list(range(20)), max_tokens=50))
    sched.add_request(create_request("b", list(range(20)), max_tokens=50))
    step(sched)
    step(sched)
    assert sched.kv.pool.num_free_blocks < sched.kv.pool.num_blocks
    done = sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert {r.status for r in done} == {RequestStatus.FINISHED_ABORTED}
    assert not sched.running and not sched.waiting
    assert_no_leaks(sched)


def test_waiting_request_that_does_not_fit_waits():
    sched = create_scheduler(num_blocks=4, block_size=4, max_len=64)
    sched.add_request(create_request("big", list(range(14)), max_tokens=1))
    sched.add_request(create_request("next", list(range(14)), max_tokens=1))
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["big"]
    assert list(r.request_id for r in sched.waiting) == ["next"]
    run_to_completion(sched)
    assert_no_leaks(sched)


def test_n_siblings_share_the_prompt_blocks():
    sched = create_scheduler(num_blocks=32, block_size=4)
    prompt = list(range(1, 18))  # 4 full blocks + 1 token
    leader = create_request("g-0", prompt, max_tokens=3)
    sibling = create_request("g-1", prompt, max_tokens=3)
    sibling.group_id = "g-0"
    sched.add_request(leader)
    sched.add_request(sibling)
    out, _ = step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["g-0"]  # sibling waits for the leader's prompt
    out, _ = step(sched)
    by_id = {s.request.request_id: s for s in out.scheduled}
    assert by_id["g-1"].num_tokens == 1  # 16 prompt tokens came from the leader's cached blocks
    shared = set(sched.kv.block_ids("g-0")[:4])
    assert shared == set(sched.kv.block_ids("g-1")[:4])
    assert all(sched.kv.pool.blocks[b].ref_cnt == 2 for b in shared)
    run_to_completion(sched)
    assert_no_leaks(sched)


def test_stop_token_min_tokens_and_length():
    sched = create_scheduler()
    r = create_request("a", [1, 2], max_tokens=10, stop_token_ids=[7], min_tokens=2)
    sched.add_request(r)
    run_to_completion(sched)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.num_output_tokens == 2
    r2 = create_request("b", [1, 2], max_tokens=3)
    sched.add_request(r2)
    run_to_completion(sched)
    assert r2.status == RequestStatus.FINISHED_LENGTH_CAPPED and r2.num_output_tokens == 3
    assert_no_leaks(sched)


def test_one_long_prefill_at_a_time_and_short_prompts_go_first():
    """Long prompts (>= a quarter of the budget still to compute) are prefilled one per step, oldest first; a short
    prompt behind them is admitted at once, and a waiting long one starts when the first finishes its prefill."""
    sched = create_scheduler(num_blocks=64, budget=64, max_len=512)  # long: >= 16 tokens to compute
    sched.add_request(create_request("long1", list(range(100, 140)), max_tokens=3))
    sched.add_request(create_request("long2", list(range(200, 240)), max_tokens=3))
    sched.add_request(create_request("short", [1, 2, 3], max_tokens=3))
    out, _ = step(sched)
    assert {s.request.request_id: s.num_tokens for s in out.scheduled} == {"long1": 40, "short": 3}
    assert [r.request_id for r in sched.waiting] == ["long2"]
    out, _ = step(sched)
    assert {s.request.request_id: s.num_tokens for s in out.scheduled} == {"long1": 1, "short": 1, "long2": 40}
    assert set(run_to_completion(sched)) == {"long1", "long2", "short"}
    assert_no_leaks(sched)


def test_a_chunked_long_prefill_keeps_its_turn_until_it_is_short():
    """A prompt longer than the budget takes every step's budget until what is left of it is short; then the next
    long prompt shares the step. ``max_long_partial_prefills=2`` lets two long prompts share each step."""
    kv = KVCacheManager(128, 4, True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=32, max_model_len=512), kv)
    sched.add_request(create_request("a", list(range(100, 170)), max_tokens=1))  # 70 tokens: 32 + 32 + 6
    sched.add_request(create_request("b", list(range(200, 240)), max_tokens=1))
    chunks = [{s.request.request_id: s.num_tokens for s in step(sched)[0].scheduled} for _ in range(3)]
    assert chunks == [{"a": 32}, {"a": 32}, {"a": 6, "b": 26}]
    run_to_completion(sched)
    assert_no_leaks(sched)

    both = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=512,
                                     max_long_partial_prefills=2), KVCacheManager(128, 4, True))
    for name in ("x", "y", "z"):
        both.add_request(create_request(name, list(range(300, 330)), max_tokens=1))
    out, _ = step(both)
    assert {s.request.request_id: s.num_tokens for s in out.scheduled} == {"x": 30, "y": 30}


def test_long_prefill_settings_are_checked():
    import pytest

    with pytest.raises(ValueError, match="max_long_partial_prefills: must be >= 1"):
        SchedulerConfig(max_long_partial_prefills=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold: must be >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    assert SchedulerConfig(max_num_batched_tokens=2048).long_prefill_tokens == 512
    assert SchedulerConfig(long_prefill_token_threshold=100).long_prefill_tokens == 100


def test_long_prefill_flags_reach_the_scheduler_config(smol_dir):
    import argparse

    from tandem.engine.cli import add_engine_arguments, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--model", str(smol_dir), "--max-long-partial-prefills", "3",
                              "--long-prefill-token-threshold", "700"])
    sched = engine_config_from_args(args).scheduler
    assert (sched.max_long_partial_prefills, sched.long_prefill_tokens) == (3, 700)


def test_a_waiting_long_prompt_is_counted_once_in_the_prefix_stats():
    """A long prompt held back for several steps is looked up each step but counted once, when admitted."""
    sched = create_scheduler(num_blocks=64, budget=64, max_len=512)
    sched.add_request(create_request("first", list(range(100, 140)), max_tokens=3))
    sched.add_request(create_request("second", list(range(200, 240)), max_tokens=3))
    step(sched)
    step(sched)  # "second" waited one step, then was admitted
    run_to_completion(sched)
    assert sched.kv.prefix_stats.queries == 80
