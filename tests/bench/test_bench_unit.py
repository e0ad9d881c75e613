"""Fast tests of tandem bench's parts that need no server: input checking, datasets, statistics."""

from __future__ import annotations

import json
import math

import pytest

from tandem.bench import BenchConfig, BenchError, RequestRecord, parse_goodput, sample_requests, summarize
from tandem.bench.client import endpoint_url
from tandem.bench.runner import arrival_offsets
from tandem.cli import main


def create_config(**overrides) -> BenchConfig:
    """A small valid config; keyword arguments override any field."""
    fields = {"base_url": "http://127.0.0.1:9", "model": "m", "num_prompts": 8, "input_len": 16, "output_len": 8}
    fields.update(overrides)
    return BenchConfig(**fields)


def create_record(index: int, ttft_s: float, e2e_s: float, output_tokens: int, itl_s=(), **overrides) -> RequestRecord:
    """A successful request record with server usage."""
    record = RequestRecord(index=index, expected_prompt_len=10, max_tokens=output_tokens, start_s=0.0,
                           success=True, status_code=200, ttft_s=ttft_s, itl_s=list(itl_s), e2e_s=e2e_s,
                           prompt_tokens=10, output_tokens=output_tokens, usage_reported=True,
                           num_content_chunks=len(itl_s) + 1)
    for name, value in overrides.items():
        setattr(record, name, value)
    return record


def test_parse_goodput_reads_milliseconds():
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    assert parse_goodput(None) == {}


@pytest.mark.parametrize("spec, message", [
    (["ttft=500"], "expected KEY:MILLISECONDS"),
    (["latency:5"], "choose from ttft, tpot, e2el"),
    (["ttft:fast"], "not a number"),
    (["ttft:0"], "positive"),
    (["ttft:nan"], "positive"),
    (["ttft:1", "ttft:2"], "given twice"),
])
def test_parse_goodput_rejects_bad_specs(spec, message):
    with pytest.raises(BenchError, match=message):
        parse_goodput(spec)


@pytest.mark.parametrize("overrides, message", [
    ({"base_url": "127.0.0.1:8000"}, "must start with http"),
    ({"num_prompts": 0}, "--num-prompts"),
    ({"request_rate": 0.0}, "--request-rate"),
    ({"max_concurrency": 0}, "--max-concurrency"),
    ({"dataset": "sharegpt"}, "needs --dataset-path"),
    ({"dataset": "sharegpt", "dataset_path": "/nonexistent/sharegpt.json"}, "dataset file not found"),
    ({"endpoint": "embeddings"}, "--endpoint"),
    ({"range_ratio": 1.0}, "--range-ratio"),
    ({"tokenizer": "/nonexistent/tokenizer.json"}, "tokenizer not found"),
])
def test_config_rejects_bad_input(overrides, message):
    with pytest.raises(BenchError, match=message):
        create_config(**overrides)


def test_endpoint_url_accepts_root_or_v1():
    assert endpoint_url("http://h:1", "completions") == "http://h:1/v1/completions"
    assert endpoint_url("http://h:1/v1", "chat") == "http://h:1/v1/chat/completions"


def test_random_dataset_has_requested_lengths_and_is_seeded():
    config = create_config(num_prompts=20, input_len=32, output_len=8)
    requests, warnings = sample_requests(config)
    assert warnings == []
    assert len(requests) == 20
    assert all(len(r.user.split()) == 32 and r.expected_prompt_len == 32 for r in requests)
    assert all(r.output_len == 8 for r in requests)
    assert len({r.user for r in requests}) == 20  # distinct prompts: no accidental prefix sharing
    assert [r.user for r in sample_requests(config)[0]] == [r.user for r in requests]
    assert [r.user for r in sample_requests(create_config(num_prompts=20, input_len=32, seed=1))[0]] != [
        r.user for r in requests
    ]


def test_random_dataset_range_ratio_varies_lengths_within_bounds():
    requests, _ = sample_requests(create_config(num_prompts=50, input_len=40, output_len=20, range_ratio=0.5))
    input_lens = [len(r.user.split()) for r in requests]
    assert min(input_lens) >= 20 and max(input_lens) <= 60 and len(set(input_lens)) > 5
    assert all(10 <= r.output_len <= 30 for r in requests)


def test_shared_prefix_dataset_models_tenants():
    config = create_config(dataset="shared-prefix", num_prompts=12, num_prefixes=3, prefix_len=100, input_len=10)
    requests, _ = sample_requests(config)
    by_tenant: dict[str, set[str]] = {}
    for r in requests:
        by_tenant.setdefault(r.group, set()).add(r.system)
        assert len(r.user.split()) == 10
        assert r.completion_prompt().startswith(r.system)
        assert r.chat_messages()[0] == {"role": "system", "content": r.system}
    assert sorted(by_tenant) == ["tenant-0", "tenant-1", "tenant-2"]
    assert all(len(systems) == 1 for systems in by_tenant.values())  # one shared prompt per tenant
    systems = [next(iter(s)) for s in by_tenant.values()]
    assert len(set(systems)) == 3 and all(len(s.split()) == 100 for s in systems)
    assert [r.group for r in requests].count("tenant-0") == 4  # spread evenly


def write_sharegpt(path, conversations) -> str:
    path.write_text(json.dumps(conversations))
    return str(path)


def test_sharegpt_dataset_takes_first_exchange_and_filters(tmp_path):
    long_reply = " ".join(["word"] * 50)
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "what is the capital of france please"},
                                      {"from": "gpt", "value": long_reply}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_reply}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "starts with the model so it is skipped"},
                                      {"from": "human", "value": long_reply}]},
        {"id": "d", "conversations": [{"from": "human", "value": "only one turn here"}]},
    ]
    path = write_sharegpt(tmp_path / "sg.json", data)
    requests, warnings = sample_requests(create_config(dataset="sharegpt", dataset_path=path, num_prompts=3,
                                                       output_len=None))
    assert {r.user for r in requests} == {"what is the capital of france please"}
    assert all(r.output_len == 50 for r in requests)  # from the recorded reply
    assert len(requests) == 3 and "only 1 usable" in warnings[0]
    requests, _ = sample_requests(create_config(dataset="sharegpt", dataset_path=path, num_prompts=1, output_len=7))
    assert requests[0].output_len == 7


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"conversations": []}', "expected a JSON list"),
    ('[{"conversations": [{"from": "human", "value": "hi"}]}]', "no usable conversation"),
])
def test_sharegpt_dataset_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BenchError, match=message):
        sample_requests(create_config(dataset="sharegpt", dataset_path=str(path)))


def test_arrival_offsets_are_poisson_and_seeded():
    offsets = arrival_offsets(2000, 10.0, seed=3)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert 0.09 < sum(gaps) / len(gaps) < 0.11  # mean gap 1/rate
    assert offsets == arrival_offsets(2000, 10.0, seed=3)
    assert arrival_offsets(5, math.inf, seed=3) == [0.0] * 5


def test_summarize_computes_throughput_percentiles_and_goodput():
    records = [
        create_record(0, ttft_s=0.1, e2e_s=1.0, output_tokens=10, itl_s=[0.1] * 9),
        create_record(1, ttft_s=0.3, e2e_s=2.1, output_tokens=10, itl_s=[0.2] * 9),
        create_record(2, ttft_s=0.2, e2e_s=0.2, output_tokens=1),
        RequestRecord(index=3, expected_prompt_len=10, max_tokens=10, error="HTTP 401: no", status_code=401),
    ]
    summary = summarize(records, duration_s=4.0, goodput_slo_ms={"ttft": 250.0, "tpot": 150.0})
    assert (summary.num_requests, summary.completed, summary.errors) == (4, 3, 1)
    assert (summary.total_prompt_tokens, summary.total_output_tokens) == (30, 21)
    assert summary.request_throughput == pytest.approx(0.75)
    assert summary.output_throughput == pytest.approx(21 / 4)
    assert summary.total_token_throughput == pytest.approx(51 / 4)
    assert summary.ttft.count == 3 and summary.ttft.mean_ms == pytest.approx(200.0)
    assert summary.ttft.p50_ms == pytest.approx(200.0)
    assert summary.tpot.count == 2  # a one-token request has no TPOT
    assert summary.tpot.mean_ms == pytest.approx(150.0)
    assert summary.itl.count == 18 and summary.itl.p50_ms == pytest.approx(150.0)
    assert summary.e2el.p99_ms <= 2100.0 + 1e-9
    # Request 0 meets both SLOs; 1 misses TTFT; 2 has no TPOT and meets TTFT.
    assert summary.good_requests == 2 and summary.goodput == pytest.approx(0.5)
    assert summary.requests_without_usage == 0


def test_summarize_of_only_failures_has_no_latencies():
    records = [RequestRecord(index=i, expected_prompt_len=5, max_tokens=5, error="HTTP 401") for i in range(3)]
    summary = summarize(records, duration_s=1.0, goodput_slo_ms={})
    assert (summary.completed, summary.errors, summary.total_output_tokens) == (0, 3, 0)
    assert summary.ttft.mean_ms is None and summary.goodput is None


@pytest.mark.parametrize("argv, message", [
    (["bench", "serve", "--model", "m", "--goodput", "ttft=5"], "bad --goodput spec"),
    (["bench", "serve", "--model", "m", "--dataset", "sharegpt", "--dataset-path", "/nonexistent.json"],
     "dataset file not found: /nonexistent.json"),
    (["bench", "sweep", "--model", "m", "--concurrencies", "1,two"], "comma-separated list"),
])
def test_cli_reports_bad_input_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem bench: error: ") and message in err
    assert "Traceback" not in err
