"""Done-when 2 (leaks): many disaggregated requests, one after another and at once, leave both workers'
KV pools whole (``tandem:kv_cache_blocks_free == tandem:kv_cache_blocks_total``), every lease released by the
reader's notification (none by expiry), and no transfer failure."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from disagg_client import completion_body, completion_text, kv_metric, metrics, prefill_params, wait_all_blocks_free

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=50)) as c:
        yield c


def one_request(client, prefill, decode, i: int, stream: bool) -> str:
    # Two tokens (EOS ignored): the first comes from the prefill worker, the second needs the pulled KV.
    body = completion_body(f"Request number {i}: write one short sentence about the number {i * 7}.", 2,
                           ignore_eos=True)
    params = prefill_params(client, prefill.url, body)
    # completion_text asserts a 200 (and, streamed, no error event).
    return completion_text(client, decode.url, {**body, "stream": stream, "kv_transfer_params": params})


def assert_pools_whole(client, *workers) -> None:
    for w in workers:
        free, total = wait_all_blocks_free(client, w.url)
        assert free == total, f"{w.url}: {total - free} blocks still in use"


def failures(client, prefill, decode) -> tuple[float, float]:
    return (kv_metric(metrics(client, prefill.url), "failures_total", "prefill"),
            kv_metric(metrics(client, decode.url), "failures_total", "decode"))


def test_100_sequential_requests_leave_every_block_free(client, prefill, decode):
    before = metrics(client, decode.url)
    failures_before = failures(client, prefill, decode)
    for i in range(100):
        one_request(client, prefill, decode, i, stream=i % 2 == 1)
    assert_pools_whole(client, prefill, decode)
    after = metrics(client, decode.url)
    # Every request pulled its KV (one READ each), and none failed or had to wait for a lease to expire.
    assert kv_metric(after, "duration_seconds_count", "decode") - kv_metric(before, "duration_seconds_count", "decode") == 100
    assert failures(client, prefill, decode) == failures_before


def test_20_concurrent_requests_leave_every_block_free(client, prefill, decode):
    failures_before = failures(client, prefill, decode)
    with ThreadPoolExecutor(20) as pool:
        texts = list(pool.map(lambda i: one_request(client, prefill, decode, 1000 + i, stream=i % 2 == 0), range(20)))
    assert len(texts) == 20
    assert_pools_whole(client, prefill, decode)
    assert failures(client, prefill, decode) == failures_before
