"""Every error class of the server: status code and OpenAI-shaped body."""

from __future__ import annotations

import json
import os
import re
import time

import httpx
import pytest

from procs import metric_value, start_serve
from server.conftest import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_missing_or_wrong_api_key_is_401_but_health_and_metrics_stay_open(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert_error(httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("n", 0), ("logprobs", 50),
    ("min_tokens", -1), ("presence_penalty", 5),
])
def test_invalid_parameters_are_400_naming_the_parameter(server, field, value):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", field: value}, headers=AUTH)
    err = assert_error(r, 400, param=field)
    assert field in err["message"]


def test_wrong_types_are_400_without_pydantic_internals(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": "ten"}, headers=AUTH)
    err = assert_error(r, 400, param="max_tokens")
    assert "pydantic" not in err["message"] and "http" not in err["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hello"}, headers=AUTH)
    assert_error(r, 400, param="messages")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={}, headers=AUTH)
    assert "required" in assert_error(r, 400, param="messages")["message"]
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]},
                   headers=AUTH)
    assert_error(r, 400, param="messages")


def test_unknown_model_is_404(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-9", "prompt": "hi"}, headers=AUTH)
    assert_error(r, 404, param="model", code="model_not_found")


def test_prompt_longer_than_context_is_400(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1] * (MAX_MODEL_LEN + 5)}, headers=AUTH)
    assert_error(r, 400, code="context_length_exceeded")
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1] * 1000, "max_tokens": 100}, headers=AUTH)
    assert_error(r, 400, param="max_tokens", code="context_length_exceeded")


def test_suffix_and_unsupported_fields_are_rejected(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "suffix": "end"}, headers=AUTH)
    assert_error(r, 400, param="suffix")
    # Known OpenAI fields we cannot honour, and fields nobody defines, are a 400 naming them (never ignored).
    for endpoint, body, param in (
            ("completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
            ("completions", {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}},
             "stream_options"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "audio": {"voice": "x"}}, "audio"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "modalities": ["audio"]},
             "modalities"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prediction": {"content": "x"}},
             "prediction"),
            ("chat/completions", {"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}, "messages")):
        err = assert_error(httpx.post(f"{server.url}/v1/{endpoint}", json=body, headers=AUTH), 400, param=param)
        assert param in err["message"]
    # Their harmless values are accepted.
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "hi"}], "modalities": ["text"], "store": False, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_unknown_route_is_404_json(server):
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404)


def _blocks(server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return (metric_value(text, "tandem:kv_cache_blocks_free"), metric_value(text, "tandem:kv_cache_blocks_total"))


def test_client_disconnect_mid_stream_returns_the_blocks(server):
    free_before, total = _blocks(server)
    body = {"prompt": "Tell me a very long story about a dragon. " * 20, "max_tokens": 400, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=body,
                                                 headers=AUTH) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: {") for line in got)
        free_during, _ = _blocks(server)
        assert free_during < total  # the request holds blocks while it streams
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        running = metric_value(text, "vllm:num_requests_running")
        free, _ = _blocks(server)
        if running == 0 and free == total:
            break
        time.sleep(0.2)
    assert running == 0
    assert free == total
    assert metric_value(text, "vllm:request_success_total", finished_reason="abort") >= 1


def test_non_streaming_disconnect_aborts_too(server):
    body = {"prompt": "Count to one thousand:", "max_tokens": 600, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=1.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric_value(text, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.2)
    free, total = _blocks(server)
    assert metric_value(text, "vllm:num_requests_running") == 0 and free == total


def test_metrics_use_vllm_names_with_model_label(server, client):
    client.completions.create(model="smol", prompt="Hello", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_count",
                 "vllm:request_inference_time_seconds_count"):
        assert metric_value(text, name, model_name="smol") >= 0, name
    assert metric_value(text, "vllm:generation_tokens_total", model_name="smol") >= 3


def test_request_phase_times_are_observed_once_each_and_add_up(server, client):
    phases = ("queue_time", "prefill_time", "decode_time", "inference_time")

    def snapshot() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        out = {f"{p}_{k}": metric_value(text, f"vllm:request_{p}_seconds_{k}", model_name="smol")
               for p in phases for k in ("count", "sum")}
        for k in ("count", "sum"):
            out[f"ttft_{k}"] = metric_value(text, f"vllm:time_to_first_token_seconds_{k}", model_name="smol")
            out[f"e2e_{k}"] = metric_value(text, f"vllm:e2e_request_latency_seconds_{k}", model_name="smol")
        return out

    before = snapshot()
    client.completions.create(model="smol", prompt="Count to ten:", max_tokens=8, temperature=0)
    after = snapshot()
    d = {k: after[k] - before[k] for k in after}
    for p in phases:
        assert d[f"{p}_count"] == 1, p
    prefill, decode, inference = d["prefill_time_sum"], d["decode_time_sum"], d["inference_time_sum"]
    assert 0 < prefill <= d["ttft_sum"]  # the server's TTFT adds queueing and HTTP to the engine's prefill
    assert 0 < decode < inference <= d["e2e_sum"]
    assert inference == pytest.approx(prefill + decode, abs=0.01)


def test_process_and_gc_metrics_and_the_start_up_heap_is_frozen(server, client):
    client.completions.create(model="smol", prompt="Count to three:", max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "process_cpu_seconds_total") > 0
    assert metric_value(text, "process_resident_memory_bytes") > 100e6  # the model's weights at least
    assert metric_value(text, "python_gc_collections_total", generation="0") > 0
    match = re.search(r"engine: froze (\d+) start-up objects out of garbage collection", server.output())
    assert match and int(match[1]) > 10_000, server.output()[-2000:]


def test_queue_full_is_503_and_loading_is_503():
    proc = start_serve("--max-num-seqs", "1", "--max-waiting-requests", "1", "--max-model-len", "512",
                       "--kv-cache-memory", "64MiB", wait=False)
    try:
        # Before the model is loaded, /health and requests answer 503.
        deadline = time.monotonic() + 60
        early = None
        while time.monotonic() < deadline and early is None:
            try:
                early = httpx.get(f"{proc.url}/health", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.05)
        if early.status_code == 503:
            assert_error(early, 503, code="model_loading")
        proc.wait_healthy()
        long = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{proc.url}/v1/completions", json=long) as first:
            first_lines = first.iter_lines()  # NOTE: keep the iterator: dropping it closes the connection
            next(first_lines)  # the first request is running
            with c.stream("POST", f"{proc.url}/v1/completions", json=long) as second:
                deadline = time.monotonic() + 20
                while metric_value(httpx.get(f"{proc.url}/metrics").text, "vllm:num_requests_waiting") < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                third = httpx.post(f"{proc.url}/v1/completions", json={"prompt": "hi"})
                assert_error(third, 503, code="queue_full")
                assert second.status_code == 200
    finally:
        assert proc.terminate() == 0


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero():
    proc = start_serve("--max-model-len", "512", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "20")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True}
        chunks = []
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{proc.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            chunks.append(next(lines))
            proc.proc.terminate()  # SIGTERM while the stream is in flight
            chunks.extend(lines)
        payloads = [json.loads(x[6:]) for x in chunks if x.startswith("data: {")]
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"
        assert [x for x in chunks if x][-1] == "data: [DONE]"
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_server_does_not_spin(server, client):
    client.completions.create(model="smol", prompt="Hi", max_tokens=2)
    time.sleep(0.5)
    before = _cpu_seconds(server.proc.pid)
    time.sleep(2.0)
    assert _cpu_seconds(server.proc.pid) - before < 0.4  # an idle engine blocks on its command queue


def test_an_engine_that_cannot_start_ends_the_server_with_status_1_and_the_reason():
    # 8 MiB holds 22 blocks of SmolLM2's KV; one 512-token sequence needs 32: the model loads, the engine
    # refuses, and the process must exit (an orchestrator sees a crash) rather than answer 503 forever.
    proc = start_serve("--max-model-len", "512", "--kv-cache-memory", "8MiB", wait=False)
    try:
        assert proc.proc.wait(180) == 1
        output = proc.output()
        assert "kv_cache_memory" in output and "512" in output
        assert "Traceback" not in output
    finally:
        proc.kill()
