"""Done-when 1 and 4: greedy output through prefill -> decode equals ``tandem serve``, token for token, for
prompts of 5 to 1,500 tokens, streamed and not; both roles count the transfers in ``tandem:kv_transfer_*``."""

from __future__ import annotations

import time

import httpx
import pytest
from disagg_client import (
    completion_body,
    completion_text,
    kv_metric,
    metrics,
    prefill_params,
    sse_events,
    wait_all_blocks_free,
)
from procs import ROOT

pytestmark = pytest.mark.slow

# Distinct prompt lengths around block edges (block 16: the decode side loads all P prompt tokens and
# computes only the prefill's first token) up to 1,500.
PROMPT_LENGTHS = (5, 16, 17, 300, 1500)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=180) as c:
        yield c


@pytest.fixture(scope="module")
def corpus_ids(client, serve) -> list[int]:
    """Token ids of real prose and code (this repository's docs and engine), enough for the longest prompt."""
    text = "\n\n".join((ROOT / p).read_text() for p in ("docs/interfaces.md", "tandem/engine/core/scheduler.py",
                                                         "tandem/engine/llm_engine.py"))
    r = client.post(f"{serve.url}/tokenize", json={"prompt": text, "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert len(ids) > 4000
    return ids


def prompt_of(corpus_ids: list[int], length: int) -> list[int]:
    # A different window per length, so each prompt is new to both engines' prefix caches.
    start = (length * 7) % (len(corpus_ids) - length)
    return corpus_ids[start : start + length]


def token_strings(response: dict) -> list[str]:
    return response["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_disaggregated_greedy_output_equals_aggregated(client, prefill, decode, serve, corpus_ids, length):
    prompt = prompt_of(corpus_ids, length)
    body = completion_body(prompt, MAX_TOKENS, logprobs=1)
    r = client.post(f"{serve.url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    expected = r.json()
    assert len(token_strings(expected)) == MAX_TOKENS or expected["choices"][0]["finish_reason"] == "stop"

    before = metrics(client, decode.url)
    params = prefill_params(client, prefill.url, body)
    assert params["num_prompt_tokens"] == length
    assert len(params["remote_block_ids"]) == -(-length // 16)
    # The prefill worker's first token is the aggregated engine's first token; the decode side streams it.
    first_logprob = params["first_token_logprobs"][str(params["first_token_id"])]
    assert first_logprob == pytest.approx(expected["choices"][0]["logprobs"]["token_logprobs"][0], abs=1e-4)
    r = client.post(f"{decode.url}/v1/completions", json={**body, "kv_transfer_params": params})
    assert r.status_code == 200, r.text
    got = r.json()
    assert token_strings(got) == token_strings(expected)
    assert got["choices"][0]["text"] == expected["choices"][0]["text"]
    after = metrics(client, decode.url)
    # The decode worker pulled every block of the prompt (a new prompt: nothing cached locally).
    pulled = kv_metric(after, "blocks_total", "decode") - kv_metric(before, "blocks_total", "decode")
    assert pulled == -(-length // 16)

    # Streamed: a second prefill (its prefix cache now holds the prompt) and a decode that has the full
    # blocks cached already, so it pulls at most the last, partial block.
    stream_body = {**completion_body(prompt, MAX_TOKENS), "stream": True}
    params = prefill_params(client, prefill.url, stream_body)
    text = completion_text(client, decode.url, {**stream_body, "kv_transfer_params": params})
    assert text == expected["choices"][0]["text"]


def test_chat_streamed_through_prefill_and_decode_equals_aggregated(client, prefill, decode, serve):
    body = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    expected = completion_text(client, serve.url, body, "/v1/chat/completions")
    params = prefill_params(client, prefill.url, body, "/v1/chat/completions")
    events = sse_events(client, f"{decode.url}/v1/chat/completions",
                        {**body, "stream": True, "kv_transfer_params": params})
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == expected
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_transfer_metrics_on_both_roles(client, prefill, decode):
    p_before, d_before = metrics(client, prefill.url), metrics(client, decode.url)
    body = completion_body("Metrics count the bytes, the blocks and the time of every transfer " * 6, 2)
    params = prefill_params(client, prefill.url, body)
    completion_text(client, decode.url, {**body, "kv_transfer_params": params})
    blocks = -(-params["num_prompt_tokens"] // 16)
    bytes_per_block = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M, float32: every layer, K and V
    d_after = metrics(client, decode.url)
    assert kv_metric(d_after, "blocks_total", "decode") - kv_metric(d_before, "blocks_total", "decode") == blocks
    assert kv_metric(d_after, "bytes_total", "decode") - kv_metric(d_before, "bytes_total", "decode") == blocks * bytes_per_block
    assert kv_metric(d_after, "duration_seconds_count", "decode") - kv_metric(d_before, "duration_seconds_count", "decode") == 1
    # The prefill side learns of the READ from its completion notification, shortly after.
    for _ in range(50):
        p_after = metrics(client, prefill.url)
        if kv_metric(p_after, "blocks_total", "prefill") > kv_metric(p_before, "blocks_total", "prefill"):
            break
        time.sleep(0.1)
    assert kv_metric(p_after, "blocks_total", "prefill") - kv_metric(p_before, "blocks_total", "prefill") == blocks
    assert kv_metric(p_after, "bytes_total", "prefill") - kv_metric(p_before, "bytes_total", "prefill") == blocks * bytes_per_block
    assert kv_metric(p_after, "failures_total", "prefill") == 0
    assert kv_metric(d_after, "failures_total", "decode") == 0


def test_seeded_sampling_through_prefill_and_decode_equals_aggregated(client, prefill, decode, serve):
    """The decode worker continues the seeded random stream after the prefill worker's first token."""
    body = completion_body("Write a short poem about the sea and the wind, in four lines.", 10,
                           temperature=0.9, top_p=0.95, seed=1234)
    expected = completion_text(client, serve.url, body)
    params = prefill_params(client, prefill.url, body)
    got = completion_text(client, decode.url, {**body, "kv_transfer_params": params})
    assert got == expected
    # Sampled, not greedy: another seed gives another text (else this test would prove nothing).
    assert completion_text(client, serve.url, {**body, "seed": 99}) != expected


def test_a_first_token_that_ends_the_request_needs_no_transfer(client, prefill, decode, serve):
    """max_tokens 1: the decode worker answers with the prefill's token at once, pulls nothing, and
    tells the prefill worker to drop its lease instead of letting it run out."""
    body = completion_body("The capital of France is", 1)
    expected = completion_text(client, serve.url, body)
    before = metrics(client, decode.url)
    params = prefill_params(client, prefill.url, body)
    r = client.post(f"{decode.url}/v1/completions", json={**body, "kv_transfer_params": params})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == expected and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 1
    assert kv_metric(metrics(client, decode.url), "blocks_total", "decode") == kv_metric(before, "blocks_total", "decode")
    free, total = wait_all_blocks_free(client, prefill.url, timeout=5)  # the lease is 30 s: freed by the notice
    assert free == total, prefill.output()[-3000:]
