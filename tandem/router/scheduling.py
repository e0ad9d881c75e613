"""Picking a worker: filters -> weighted scorers (each in [0, 1]) -> picker (highest total, random ties).

Each scorer is a small class; a ``Profile`` strings them together for one pool (prefill workers are picked
mainly by prefix hits, decode workers mainly by load).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tandem.router.index import PrefixIndex
from tandem.router.workers import Worker


@dataclass(slots=True)
class RoutingRequest:
    """What the picking path needs to know about a request."""

    model: str
    block_hashes: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0


# ---- filters ----


class Filter(Protocol):
    def filter(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[Worker]: ...


class HealthyFilter:
    """Only workers whose last active or passive health check passed."""

    def filter(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[Worker]:
        now = time.monotonic()
        return [w for w in workers if w.admits(now)]  # healthy, and not ejected as an outlier


class ModelFilter:
    """Only workers serving the requested model (workers whose models are not known yet are kept)."""

    def filter(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[Worker]:
        return [w for w in workers if w.models is None or request.model in w.models]


# ---- scorers ----


class Scorer(Protocol):
    name: str

    def score(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[float]: ...


class PrefixCacheScorer:
    """The fraction of the prompt's leading full blocks that the worker holds, from the event-fed index."""

    name = "prefix"

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index

    def score(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[float]:
        if not request.block_hashes:
            return [0.0] * len(workers)
        total = len(request.block_hashes)
        return [self._index.matched_blocks(request.block_hashes, w.url) / total for w in workers]


class QueueDepthScorer:
    """Fewer waiting requests (``vllm:num_requests_waiting``) is better: 1 / (1 + waiting)."""

    name = "queue"

    def score(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[float]:
        return [1.0 / (1.0 + max(0.0, w.num_waiting)) for w in workers]


class KVCacheUsageScorer:
    """More free KV cache is better: 1 - ``vllm:kv_cache_usage_perc`` (a fraction)."""

    name = "kv"

    def score(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - w.kv_usage)) for w in workers]


class InflightScorer:
    """Fewer requests the router itself has at the worker is better: 1 / (1 + in-flight).

    Counted by the router, so it reacts to a burst immediately, before the next metrics scrape.
    """

    name = "inflight"

    def score(self, request: RoutingRequest, workers: Sequence[Worker]) -> list[float]:
        return [1.0 / (1.0 + w.inflight) for w in workers]


# ---- picker and profile ----


@dataclass(slots=True)
class Pick:
    """The chosen worker, its total score and the prefix-hit fraction it offers (for metrics and the decider)."""

    worker: Worker
    score: float
    matched_blocks: int


class MaxScorePicker:
    """Highest total score; ties broken at random so equal workers share load."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, workers: Sequence[Worker], totals: Sequence[float]) -> int:
        best = max(totals)
        # Scores are sums of floats: treat near-equal totals as a tie.
        tied = [i for i, total in enumerate(totals) if best - total <= 1e-9]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class Profile:
    """One pool's pipeline: filters, then scorers with weights, then a picker."""

    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: MaxScorePicker,
        index: PrefixIndex,
    ) -> None:
        self.filters = list(filters)
        self.scorers = [(s, w) for s, w in scorers if w > 0]
        self.picker = picker
        self._index = index

    def candidates(self, request: RoutingRequest, workers: Sequence[Worker], exclude: set[str]) -> list[Worker]:
        remaining = [w for w in workers if w.url not in exclude]
        for f in self.filters:
            remaining = f.filter(request, remaining)
        return remaining

    def pick(self, request: RoutingRequest, workers: Sequence[Worker], exclude: set[str] = frozenset()) -> Pick | None:
        candidates = self.candidates(request, workers, set(exclude))
        if not candidates:
            return None
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            for i, value in enumerate(scorer.score(request, candidates)):
                totals[i] += weight * value
        for i, worker in enumerate(candidates):
            totals[i] *= worker.weight  # < 1 for a worker far slower than its peers (outlier down-weighting)
        chosen = self.picker.pick(candidates, totals)
        worker = candidates[chosen]
        return Pick(worker, totals[chosen], self._index.matched_blocks(request.block_hashes, worker.url))


class RoundRobinProfile:
    """A baseline for benchmarks: the same filters, then the next worker in turn, ignoring caches and load."""

    def __init__(self, filters: Sequence[Filter], index: PrefixIndex) -> None:
        self.filters = list(filters)
        self._index = index
        self._turn = 0

    def pick(self, request: RoutingRequest, workers: Sequence[Worker], exclude: set[str] = frozenset()) -> Pick | None:
        candidates = sorted((w for w in workers if w.url not in exclude), key=lambda w: w.url)
        for f in self.filters:
            candidates = f.filter(request, candidates)
        if not candidates:
            return None
        worker = candidates[self._turn % len(candidates)]
        self._turn += 1
        return Pick(worker, 0.0, self._index.matched_blocks(request.block_hashes, worker.url))


def build_profile(weights: dict[str, float], index: PrefixIndex, rng: random.Random) -> Profile:
    """The standard pipeline with the given scorer weights (names as in ``--scorer-weights``)."""
    scorers: dict[str, Scorer] = {
        "prefix": PrefixCacheScorer(index),
        "queue": QueueDepthScorer(),
        "kv": KVCacheUsageScorer(),
        "inflight": InflightScorer(),
    }
    return Profile(
        filters=[HealthyFilter(), ModelFilter()],
        scorers=[(scorers[name], weight) for name, weight in weights.items()],
        picker=MaxScorePicker(rng),
        index=index,
    )
