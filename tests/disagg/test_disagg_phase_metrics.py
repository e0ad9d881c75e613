"""vLLM's request phase histograms on the two roles of a disaggregated request: the prompt's prefill is timed
where it ran, and the decode worker, which streams the handed-in first token, times only its decode."""

from __future__ import annotations

import httpx
import pytest
from disagg_client import completion_body, completion_text, metrics, prefill_params
from procs import metric_value

pytestmark = pytest.mark.slow

PHASES = ("prefill_time", "decode_time", "inference_time")


def phase_counts(client: httpx.Client, url: str) -> dict[str, float]:
    """Observations per phase histogram (0 for one never observed: a labelled series appears on its first)."""
    text, counts = metrics(client, url), {}
    for p in PHASES:
        try:
            counts[p] = metric_value(text, f"vllm:request_{p}_seconds_count")
        except KeyError:
            counts[p] = 0.0
    return counts


def test_the_prefill_is_timed_on_the_prefill_worker_and_only_the_decode_on_the_decode_worker(prefill, decode):
    with httpx.Client(timeout=120) as client:
        body = completion_body("The three primary colours are", max_tokens=6)
        pre_before, dec_before = phase_counts(client, prefill.url), phase_counts(client, decode.url)
        params = prefill_params(client, prefill.url, body)
        completion_text(client, decode.url, {**body, "kv_transfer_params": params})
        pre_after, dec_after = phase_counts(client, prefill.url), phase_counts(client, decode.url)
    pre = {p: pre_after[p] - pre_before[p] for p in PHASES}
    dec = {p: dec_after[p] - dec_before[p] for p in PHASES}
    assert pre == {"prefill_time": 1, "decode_time": 1, "inference_time": 1}
    assert dec == {"prefill_time": 0, "decode_time": 1, "inference_time": 1}
