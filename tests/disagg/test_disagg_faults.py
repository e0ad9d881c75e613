"""Done-when 2: faults never lose a request or a block.

* the prefill worker dies between answering and the decode side's READ: the decode worker recomputes;
* no reader ever comes: the prefill worker frees the blocks when the lease expires;
* ``--kv-load-failure-policy fail``: a 502 JSON error (an SSE error event when streaming), blocks freed;
* an incompatible peer is refused, naming the field that differs.
"""

from __future__ import annotations

import time

import httpx
import pytest
from disagg_client import (
    LEASE_S,
    MAX_MODEL_LEN,
    MODEL,
    completion_body,
    completion_text,
    kv_metric,
    metrics,
    prefill_params,
    sse_events,
    wait_all_blocks_free,
)
from procs import metric_value

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.handshake import HandshakePayload, HandshakeServer, KVCompatibility

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=120) as c:
        yield c


def blocks_in_use(client, url) -> float:
    text = metrics(client, url)
    return metric_value(text, "tandem:kv_cache_blocks_total") - metric_value(text, "tandem:kv_cache_blocks_free")


def test_unread_blocks_are_freed_when_the_lease_expires(client, short_lease_prefill):
    url = short_lease_prefill.url
    body = completion_body("Nobody will ever read the KV of this prompt, so its lease runs out. " * 8, 1)
    params = prefill_params(client, url, body)
    assert params["lease_seconds"] == LEASE_S
    granted = time.monotonic()
    assert blocks_in_use(client, url) == len(params["remote_block_ids"])  # held for the reader
    free, total = wait_all_blocks_free(client, url, timeout=LEASE_S + 5)
    assert free == total
    assert time.monotonic() - granted >= LEASE_S - 0.5  # freed by the expiry, not earlier
    assert kv_metric(metrics(client, url), "failures_total", "prefill", reason="lease_expired") == 1


def test_fail_policy_answers_502_json_and_frees_the_blocks(client, failing_decode):
    dead_port = 9  # discard: nothing listens there, the handshake is refused at once
    params = {"do_remote_prefill": True, "remote_engine_id": "gone", "remote_host": "127.0.0.1",
              "remote_port": dead_port, "remote_block_ids": list(range(8)), "remote_request_id": "r-1",
              "num_prompt_tokens": None, "block_size": 16}
    body = completion_body("The prefill worker that computed this prompt is gone. " * 4, 4, kv_transfer_params=params)
    r = client.post(f"{failing_decode.url}/v1/completions", json=body)
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "kv_transfer_failed"
    assert error["message"].startswith("kv transfer failed:") and "handshake" in error["message"]

    events = sse_events(client, f"{failing_decode.url}/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 4, "stream": True,
                         "kv_transfer_params": params})
    assert events[-1]["error"]["code"] == "kv_transfer_failed"
    assert wait_all_blocks_free(client, failing_decode.url)[0] == wait_all_blocks_free(client, failing_decode.url)[1]
    assert kv_metric(metrics(client, failing_decode.url), "failures_total", "decode", reason="handshake") == 2


def test_incompatible_peer_is_refused_naming_the_field(client, failing_decode):
    # A peer whose handshake says its KV cache is bfloat16 while the decode worker's is float32.
    layout = KVCacheLayout(num_layers=30, num_blocks=8, block_size=16, num_kv_heads=3, head_dim=64, dtype="bfloat16")
    payload = HandshakePayload("bf16-engine", "bf16-agent", b"unused: refused before loading", 0, layout,
                               KVCompatibility.from_layout(MODEL, layout))
    with HandshakeServer("127.0.0.1", 0, lambda: payload) as peer:
        params = {"do_remote_prefill": True, "remote_engine_id": "bf16-engine", "remote_host": "127.0.0.1",
                  "remote_port": peer.port, "remote_block_ids": list(range(8)), "remote_request_id": "r-2"}
        body = completion_body("A prompt whose KV was computed in another dtype. " * 4, 4, kv_transfer_params=params)
        r = client.post(f"{failing_decode.url}/v1/completions", json=body)
    assert r.status_code == 502, r.text
    message = r.json()["error"]["message"]
    assert "dtype: local='float32' remote='bfloat16'" in message
    assert "block_size" not in message and "num_layers" not in message  # only the field that differs
    assert kv_metric(metrics(client, failing_decode.url), "failures_total", "decode", reason="incompatible") == 1
    free, total = wait_all_blocks_free(client, failing_decode.url)
    assert free == total


def test_prefill_killed_before_the_pull_recomputes_and_counts_one_failure(client, short_lease_prefill, decode, serve):
    prefill_url = short_lease_prefill.url
    # A first request through this pair: the decode worker now knows the peer (handshake cached).
    warm = completion_body("Warm up the connection between the two workers. " * 3, 2)
    params = prefill_params(client, prefill_url, warm)
    completion_text(client, decode.url, {**warm, "kv_transfer_params": params})

    body = completion_body("The prefill worker dies right after answering this prompt, so the decode worker "
                           "has to compute it again by itself. " * 3, 6)
    expected = completion_text(client, serve.url, body)
    params = prefill_params(client, prefill_url, body)
    short_lease_prefill.kill()
    before = metrics(client, decode.url)
    assert completion_text(client, decode.url, {**body, "kv_transfer_params": params}) == expected
    after = metrics(client, decode.url)
    assert kv_metric(after, "failures_total", "decode") - kv_metric(before, "failures_total", "decode") == 1
    assert kv_metric(after, "blocks_total", "decode") == kv_metric(before, "blocks_total", "decode")
    free, total = wait_all_blocks_free(client, decode.url)
    assert free == total


def test_malformed_first_token_is_a_400_naming_the_field(client, failing_decode):
    params = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 9,
              "remote_block_ids": [0], "remote_request_id": "r-2", "block_size": 16}
    for bad in ("seven", -1, 10**9):
        body = completion_body("A prompt whose prefill token was tampered with.", 4,
                               kv_transfer_params={**params, "first_token_id": bad})
        r = client.post(f"{failing_decode.url}/v1/completions", json=body)
        assert r.status_code == 400, r.text
        assert "kv_transfer_params.first_token_id" in r.json()["error"]["message"]
    free, total = wait_all_blocks_free(client, failing_decode.url)
    assert free == total


def test_a_handed_in_token_that_fills_the_context_ends_the_request_without_a_pull(client, failing_decode):
    """A prompt of max_model_len - 1 tokens plus the prefill's token fills the context: the decode worker
    answers with that token ("length") and never contacts the (here unreachable) prefill worker."""
    params = {"do_remote_prefill": True, "remote_engine_id": "gone", "remote_host": "127.0.0.1", "remote_port": 9,
              "remote_block_ids": list(range(128)), "remote_request_id": "r-3", "block_size": 16,
              "first_token_id": 42}
    body = completion_body([7] * (MAX_MODEL_LEN - 1), None, kv_transfer_params=params)  # None: up to the context
    failures_before = kv_metric(metrics(client, failing_decode.url), "failures_total", "decode")
    r = client.post(f"{failing_decode.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 1
    assert kv_metric(metrics(client, failing_decode.url), "failures_total", "decode") == failures_before
    free, total = wait_all_blocks_free(client, failing_decode.url)
    assert free == total
