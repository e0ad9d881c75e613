"""tandem bench against a real ``tandem serve`` (SmolLM2-135M on CPU) over real HTTP.

One server process for the module, started with an API key. The checks compare the bench's numbers
with the server's own: ``usage`` in every request and the Prometheus token counters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tandem.bench import BenchConfig, run_benchmark
from tandem.ports import free_port

pytestmark = pytest.mark.slow

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
API_KEY = "bench-test-key"
STARTUP_TIMEOUT_S = 240.0
NUM_PROMPTS = 12
INPUT_LEN = 32
OUTPUT_LEN = 16
CONCURRENCY = 4


def _serve_available() -> bool:
    try:
        return importlib.util.find_spec("tandem.engine.server.cli") is not None
    except ModuleNotFoundError:
        return False


class Server:
    """A running ``tandem serve`` subprocess and what the tests need to talk to it."""

    def __init__(self, base_url: str, model: str, log: Path) -> None:
        self.base_url = base_url
        self.model = model
        self.log = log

    def token_counters(self) -> tuple[float, float]:
        """(prompt tokens, generated tokens) from /metrics, summed over every label set."""
        response = httpx.get(f"{self.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        response.raise_for_status()
        totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0}
        for line in response.text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals["vllm:prompt_tokens_total"], totals["vllm:generation_tokens_total"]

    def config(self, **overrides) -> BenchConfig:
        """The small benchmark used by these tests; keyword arguments override fields."""
        fields = dict(base_url=self.base_url, model=self.model, api_key=API_KEY, num_prompts=NUM_PROMPTS,
                      input_len=INPUT_LEN, output_len=OUTPUT_LEN, max_concurrency=CONCURRENCY, timeout_s=120.0)
        fields.update(overrides)
        return BenchConfig(**fields)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Start ``tandem serve`` on a free port, wait for /health, stop it after the module."""
    if not _serve_available():
        pytest.skip("tandem serve (tandem.engine.server.cli) is not in this tree yet")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", MODEL, "--port", str(port),
           "--api-key", API_KEY, "--max-model-len", "2048"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tandem serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"tandem serve not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        model_id = models.json()["data"][0]["id"]
        yield Server(base_url, model_id, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tokenizer_dir(server):
    """The served model's tokenizer.json folder (the engine's converted copy of the GGUF)."""
    from tandem.engine.model_files import tokenizer_dir

    path = tokenizer_dir(MODEL)
    assert (path / "tokenizer.json").is_file()
    return str(path)


def assert_ordered(stats: dict) -> None:
    """p50 <= p90 <= p99, and the mean within the samples' range (checked against p0..p100 bounds)."""
    assert stats["count"] > 0
    assert 0.0 <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["mean_ms"] > 0.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_serve_cli_json_matches_server_usage_and_metrics(server, tmp_path):
    result_file, plot_file = tmp_path / "out.json", tmp_path / "out.png"
    prompt_before, generated_before = server.token_counters()
    proc = run_cli("serve", "--base-url", server.base_url, "--model", server.model, "--api-key", API_KEY,
                   "--dataset", "random", "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN),
                   "--output-len", str(OUTPUT_LEN), "--max-concurrency", str(CONCURRENCY),
                   "--goodput", "ttft:60000", "tpot:60000", "--seed", "1",
                   "--result-file", str(result_file), "--plot", str(plot_file))
    prompt_after, generated_after = server.token_counters()
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "Traceback" not in proc.stderr

    data = json.loads(result_file.read_text())
    summary, requests = data["summary"], data["requests"]
    assert summary["num_requests"] == summary["completed"] == len(requests) == NUM_PROMPTS
    assert summary["errors"] == 0 and summary["requests_without_usage"] == 0
    assert sorted(r["index"] for r in requests) == list(range(NUM_PROMPTS))
    for r in requests:
        assert r["success"] and r["usage_reported"] and r["status_code"] == 200 and r["error"] is None
        assert 1 <= r["output_tokens"] <= OUTPUT_LEN
        assert INPUT_LEN <= r["prompt_tokens"] <= INPUT_LEN + 2  # ~1 token per word, maybe a BOS
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) == r["num_content_chunks"] - 1
        assert r["num_content_chunks"] <= r["output_tokens"]
    # Token totals: the sum of per-request usage, and exactly what the server counted.
    assert summary["total_prompt_tokens"] == sum(r["prompt_tokens"] for r in requests)
    assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in requests)
    assert summary["total_prompt_tokens"] == prompt_after - prompt_before
    assert summary["total_output_tokens"] == generated_after - generated_before
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert_ordered(summary[key])
    assert summary["ttft"]["p99_ms"] <= summary["e2el"]["p99_ms"]
    # Throughputs are totals over the wall-clock duration.
    assert summary["request_throughput"] == pytest.approx(NUM_PROMPTS / summary["duration_s"])
    assert summary["output_throughput"] == pytest.approx(summary["total_output_tokens"] / summary["duration_s"])
    # A generous SLO: every request is good.
    assert summary["good_requests"] == NUM_PROMPTS
    assert data["config"]["api_key"] == "***"

    import matplotlib.image

    assert plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(str(plot_file))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600


def test_chat_shared_prefix_counts_match_metrics(server, tokenizer_dir):
    prompt_before, generated_before = server.token_counters()
    result = run_benchmark(server.config(endpoint="chat", dataset="shared-prefix", num_prefixes=2, prefix_len=64,
                                         input_len=8, output_len=8, tokenizer=tokenizer_dir, request_rate=20.0))
    prompt_after, generated_after = server.token_counters()
    s = result.summary
    assert (s.completed, s.errors) == (NUM_PROMPTS, 0)
    assert s.total_prompt_tokens == prompt_after - prompt_before
    assert s.total_output_tokens == generated_after - generated_before
    by_tenant: dict[str, set[int]] = {}
    for r in result.records:
        assert r.usage_reported and 1 <= r.output_tokens <= 8
        # The 64-token system prompt and the 8-token question both reach the model (plus the chat template).
        assert r.prompt_tokens > 64 + 8
        by_tenant.setdefault(r.group, set()).add(r.prompt_tokens)
    assert sorted(by_tenant) == ["tenant-0", "tenant-1"]
    # Same tenant, same-length question: the same prompt length, so the prefix really is shared.
    assert all(len(lengths) == 1 for lengths in by_tenant.values())


def test_tokenizer_gives_exact_prompt_lengths(server, tokenizer_dir):
    result = run_benchmark(server.config(num_prompts=4, input_len=24, output_len=4, tokenizer=tokenizer_dir))
    assert result.summary.completed == 4
    # /v1/completions applies no template: the prompt is exactly the tokens the bench built
    # (allowing one BOS token should the server add one).
    lengths = {r.prompt_tokens for r in result.records}
    assert lengths in ({24}, {25})


def test_wrong_api_key_counts_every_request_as_an_error(server):
    prompt_before, generated_before = server.token_counters()
    result = run_benchmark(server.config(api_key="not-the-key", num_prompts=6))
    assert (result.summary.completed, result.summary.errors) == (0, 6)
    assert all(r.status_code == 401 and r.error.startswith("HTTP 401") for r in result.records)
    assert result.summary.total_output_tokens == 0 and result.summary.ttft.count == 0
    assert server.token_counters() == (prompt_before, generated_before)


def test_cli_exit_code_is_1_when_nothing_succeeds(server):
    proc = run_cli("serve", "--base-url", server.base_url, "--model", server.model, "--api-key", "wrong",
                   "--num-prompts", "2", "--input-len", "8", "--output-len", "2", "--disable-tqdm")
    assert proc.returncode == 1
    assert "Failed requests:" in proc.stdout and "HTTP 401" in proc.stdout


def test_sweep_writes_runs_and_one_plot(server, tmp_path):
    result_file, plot_file = tmp_path / "sweep.json", tmp_path / "sweep.png"
    proc = run_cli("sweep", "--base-url", server.base_url, "--model", server.model, "--api-key", API_KEY,
                   "--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--concurrencies", "1,4",
                   "--disable-tqdm", "--result-file", str(result_file), "--plot", str(plot_file))
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(result_file.read_text())["runs"]
    assert [run["config"]["max_concurrency"] for run in runs] == [1, 4]
    assert all(run["summary"]["completed"] == 4 and run["summary"]["errors"] == 0 for run in runs)
    assert os.path.getsize(plot_file) > 10_000


def test_sharegpt_file_over_chat(server, tmp_path):
    conversations = [
        {"id": str(i), "conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": "a recorded answer of about eight words here"}]}
        for i, question in enumerate(["What is the capital of France?", "Name three primary colours please.",
                                      "How many legs does a spider have?"])
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    result = run_benchmark(server.config(endpoint="chat", dataset="sharegpt", dataset_path=str(path), num_prompts=3,
                                         output_len=None))
    assert (result.summary.completed, result.summary.errors) == (3, 0)
    assert result.warnings == []
    # max_tokens came from the recorded reply (8 words).
    assert all(r.max_tokens == 8 and 1 <= r.output_tokens <= 8 for r in result.records)
