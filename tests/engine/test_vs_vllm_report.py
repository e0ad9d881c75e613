"""benchmarks/vs_vllm.py's report on a saved run (no servers): medians, spread between repeats, ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vs_vllm():
    spec = importlib.util.spec_from_file_location("vs_vllm", ROOT / "benchmarks" / "vs_vllm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_vllm"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def result(tok_s: float, ttft_p50: float, ttft_p99: float, itl_p99: float) -> dict:
    return {"requests": 4, "errors": 0, "output_tok_s": tok_s, "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99,
            "itl_p50_ms": 1.0, "itl_p99_ms": itl_p99}


def saved_run(vs_vllm) -> dict:
    runs = []
    # tandem: 600 and 400 tok/s over two repeats; vLLM: 500 both times. Latencies: tandem half of vLLM's.
    for repeat, (t_tok, v_tok) in enumerate([(600.0, 500.0), (400.0, 500.0)]):
        for engine, tok in (("tandem", t_tok), ("vllm", v_tok)):
            lat = 100.0 if engine == "tandem" else 200.0
            runs.append({"engine": engine, "repeat": repeat, "ready_s": 1.0,
                         "results": {w: result(tok, lat, lat, lat) for w in
                                     ("concurrent", "single", "long", "shared_prefix")}})
    return {"meta": {"repeats": 2, "threads": 2, "quick": False}, "runs": runs}


def test_summary_medians_spread_and_ratios(vs_vllm):
    rows = {r["metric"]: r for r in vs_vllm.summarize(saved_run(vs_vllm)["runs"])}
    tput = rows["32 streams: output tok/s"]
    assert tput["tandem"]["median"] == 500.0 and tput["vllm"]["median"] == 500.0
    assert tput["tandem"]["spread"] == pytest.approx(0.4)  # (600 - 400) / 500
    assert tput["vllm"]["spread"] == 0.0
    assert tput["ratio"] == 1.0
    ttft = rows["1k-token prompts x4: TTFT p50 ms"]
    assert ttft["ratio"] == 0.5 and ttft["tandem_better_x"] == 2.0  # lower is better: half the latency = 2x


def test_table_from_saved_json(vs_vllm, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved_run(vs_vllm)))
    assert vs_vllm.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 32 streams: output tok/s | 500.0 (±0%) | 500.0 (±20%) | 1.00 | 1.00x |" in out
    assert "| 1k-token prompts x4: TTFT p50 ms | 200.0 (±0%) | 100.0 (±0%) | 0.50 | 2.00x |" in out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 1 + len(vs_vllm.METRICS)


def test_engine_order_alternates(vs_vllm):
    assert vs_vllm.engine_order(2) == [(0, "tandem"), (0, "vllm"), (1, "vllm"), (1, "tandem")]
