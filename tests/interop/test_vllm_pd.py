"""Prefill/decode with a vLLM-CPU prefill worker and a vLLM-CPU decode worker (NixlConnector) behind Tandem's router.

vLLM's decode side does not take the first token from the prefill response (ours does, ``first_token_id``): it
pulls the prompt's KV over NIXL and computes the first token again. The router speaks the same
``kv_transfer_params`` protocol to both kinds; greedy output must equal aggregated serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from .conftest import ENGINE_ARGS, free_port, metric

pytestmark = pytest.mark.slow

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHORT = "The three primary colors are"
LONG = "Rome was not built in a day. " * 40 + "Tell me about the history of Rome:"


def process_group_members(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.fixture(scope="module")
def platform(vllm_python):
    """`tandem up --engine vllm --prefill 1 --decode 1` (the real command), behind an API key; stopped at the end
    with SIGTERM, after which no process of it may be left."""
    port = free_port()
    # float32: the transferred KV and a locally computed KV must give the same greedy tokens.
    engine_args = [f"--engine-arg={arg}" for arg in [*ENGINE_ARGS, "--dtype", "float32"]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "up", "--engine", "vllm", "--engine-python", vllm_python.executable,
         "--prefill", "1", "--decode", "1", "--port", str(port), *engine_args,
         "--router-arg=--disagg-threshold=0", "--router-arg=--log-level=warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "TANDEM_API_KEY": "local-key"})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 420
        while not any("ready at" in line for line in lines):
            # The error lines first: a vLLM worker that fails to start leaves pages of shutdown noise after its cause.
            assert time.monotonic() < deadline and proc.poll() is None, "".join(
                [line for line in lines if "Error" in line or "error:" in line][-20:] + ["...\n"] + lines[-40:])
            lines.append(proc.stdout.readline())
        router = f"http://127.0.0.1:{port}"
        pools = {w["pool"]: w["url"] for w in httpx.get(router + "/health").json()["workers"]}
        members = [pid for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()
                   for pid in process_group_members(int(child))]
        yield {"router": router, "prefill": pools["prefill"], "decode": pools["decode"], "lines": lines,
               "proc": proc, "members": members}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out[-3000:]
        time.sleep(0.5)
        assert not [pid for pid in members if os.path.exists(f"/proc/{pid}") and
                    open(f"/proc/{pid}/stat").read().split()[2] != "Z"], "processes left after tandem up stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def completion(url: str, prompt: str, key: str | None = "local-key") -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(url + "/v1/completions", timeout=180, headers=headers, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def test_up_reports_progress_and_vllm_workers(platform):
    lines = "".join(platform["lines"])
    assert "vLLM 0.32.0 (cpu)" in lines
    assert "vllm-prefill-0" in lines and "vllm-decode-0" in lines and "is healthy" in lines
    assert len(platform["members"]) >= 3  # two vLLM servers (with their engine processes) and the router


@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_disaggregated_greedy_output_equals_aggregated_vllm(platform, prompt):
    router, decode = platform["router"], platform["decode"]
    transfers = metric(decode, "vllm:nixl_xfer_time_seconds_count")
    disaggregated_before = metric(router, 'tandem:router_decisions_total{decision="disaggregated"}')
    disaggregated = completion(router, prompt)["choices"][0]["text"]
    assert metric(router, 'tandem:router_decisions_total{decision="disaggregated"}') == disaggregated_before + 1
    if len(prompt) > 200:
        # The decode worker really pulled the prompt's KV blocks over NIXL (the short prompt has no full block).
        assert metric(decode, "vllm:nixl_xfer_time_seconds_count") > transfers
    # Aggregated reference: the prefill worker serving the whole request itself (workers need no key).
    aggregated = completion(platform["prefill"], prompt, key=None)["choices"][0]["text"]
    assert disaggregated == aggregated and len(disaggregated) > 0


def test_streamed_chat_through_the_prefill_hop_and_the_api_key(platform):
    with openai.OpenAI(base_url=platform["router"] + "/v1", api_key="local-key", max_retries=0, timeout=180) as client:
        stream = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": LONG}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with openai.OpenAI(base_url=platform["router"] + "/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
