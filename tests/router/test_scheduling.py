"""Filters, scorers and the picker, each on its own, then the assembled profiles."""

from __future__ import annotations

import random
from collections import Counter

from tandem.router.index import PrefixIndex
from tandem.router.scheduling import (HealthyFilter, InflightScorer, KVCacheUsageScorer, MaxScorePicker, ModelFilter,
                                      PrefixCacheScorer, QueueDepthScorer, RoundRobinProfile, RoutingRequest,
                                      build_profile)
from tandem.router.workers import Pool, Worker, parse_engine_metrics


def create_worker(url: str, **kw) -> Worker:
    return Worker(url=url, pool=Pool.AGGREGATED, healthy=kw.pop("healthy", True), **kw)


def create_index(**held: list[int]) -> PrefixIndex:
    index = PrefixIndex(ttl_s=10)
    for url, hashes in held.items():
        index.apply({"kind": "snapshot", "worker": url, "model": "m", "seq": 0, "block_hashes": hashes})
    return index


def test_filters():
    workers = [create_worker("a"), create_worker("b", healthy=False), create_worker("c", models=frozenset({"other"})),
               create_worker("d", models=frozenset({"m"}))]
    request = RoutingRequest(model="m")
    assert [w.url for w in HealthyFilter().filter(request, workers)] == ["a", "c", "d"]
    assert [w.url for w in ModelFilter().filter(request, workers)] == ["a", "b", "d"]


def test_prefix_scorer_is_fraction_of_leading_blocks():
    index = create_index(a=[1, 2, 3, 4], b=[1, 2], c=[2, 3, 4])
    workers = [create_worker(u) for u in "abcd"]
    scores = PrefixCacheScorer(index).score(RoutingRequest("m", [1, 2, 3, 4]), workers)
    assert scores == [1.0, 0.5, 0.0, 0.0]
    assert PrefixCacheScorer(index).score(RoutingRequest("m", []), workers) == [0.0] * 4


def test_load_scorers_prefer_idle_workers_and_stay_in_unit_range():
    workers = [create_worker("a", num_waiting=0, kv_usage=0.0, inflight=0),
               create_worker("b", num_waiting=3, kv_usage=0.75, inflight=1),
               create_worker("c", num_waiting=-1, kv_usage=1.5, inflight=9)]
    request = RoutingRequest("m")
    for scorer in (QueueDepthScorer(), KVCacheUsageScorer(), InflightScorer()):
        scores = scorer.score(request, workers)
        assert all(0.0 <= s <= 1.0 for s in scores), scorer.name
        assert scores[0] > scores[1], scorer.name
    assert QueueDepthScorer().score(request, workers)[1] == 0.25
    assert KVCacheUsageScorer().score(request, workers) == [1.0, 0.25, 0.0]


def test_picker_takes_highest_and_breaks_ties_at_random():
    picker = MaxScorePicker(random.Random(0))
    workers = [create_worker(u) for u in "abc"]
    assert picker.pick(workers, [0.1, 0.9, 0.5]) == 1
    picks = Counter(picker.pick(workers, [1.0, 1.0, 0.2]) for _ in range(200))
    assert set(picks) == {0, 1} and min(picks.values()) > 50


def test_profile_prefers_prefix_holder_unless_it_is_much_busier():
    index = create_index(a=[1, 2, 3, 4])
    profile = build_profile({"prefix": 3, "queue": 1, "kv": 1, "inflight": 1}, index, random.Random(0))
    a, b = create_worker("a"), create_worker("b")
    request = RoutingRequest("m", [1, 2, 3, 4], 64)
    pick = profile.pick(request, [a, b])
    assert pick.worker is a and pick.matched_blocks == 4
    a.inflight = 1  # a little busier: the cache still wins
    assert profile.pick(request, [a, b]).worker is a
    a.healthy = False
    assert profile.pick(request, [a, b]).worker is b
    assert profile.pick(request, [a, b], exclude={"b"}) is None


def test_load_only_profile_spreads_by_inflight():
    index = create_index(a=[1])
    profile = build_profile({"prefix": 0, "queue": 1, "kv": 1, "inflight": 2}, index, random.Random(0))
    a, b = create_worker("a", inflight=2), create_worker("b")
    assert profile.pick(RoutingRequest("m", [1]), [a, b]).worker is b


def test_round_robin_cycles_over_healthy_workers():
    profile = RoundRobinProfile([HealthyFilter()], create_index())
    workers = [create_worker("a"), create_worker("b"), create_worker("c", healthy=False)]
    assert [profile.pick(RoutingRequest("m"), workers).worker.url for _ in range(4)] == ["a", "b", "a", "b"]


def test_parse_engine_metrics():
    text = ('# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{model_name="m"} 3.0\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_running 2\nother 1\n')
    assert parse_engine_metrics(text) == {"num_waiting": 3.0, "kv_usage": 0.5, "num_running": 2.0}
