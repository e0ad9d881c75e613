"""`tandem serve --speculative-config`: the same streamed output as plain serving, fewer steps, vLLM metrics."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from procs import metric_value, start_serve
from server.conftest import API_KEY, MAX_MODEL_LEN

COPY = ("Copy this text exactly, word for word:\n\n" + "The quick brown fox jumps over the lazy dog. " * 3
        + "\nA journey of a thousand miles begins with a single step.")


def test_malformed_speculative_config_is_a_clear_cli_error():
    for value, message in (("{bad", "not valid JSON"), ('{"method": "eagle"}', "only 'ngram'"),
                           ('{"num_speculative_tokens": 99}', "num_speculative_tokens")):
        proc = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--speculative-config", value],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_speculative_server_streams_what_the_plain_server_does(server):
    spec = start_serve("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
                       "--kv-cache-memory", "256MiB", "--served-model-name", "smol", "--threads", "2",
                       "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}')
    try:
        import openai

        def stream(url: str, **extra) -> tuple[str, list[str], str | None]:
            with openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
                chunks = list(client.chat.completions.create(
                    model="smol", messages=[{"role": "user", "content": COPY}], max_tokens=60, temperature=0,
                    stream=True, logprobs=True, top_logprobs=1, **extra))
            tokens = [lp.token for c in chunks if c.choices and c.choices[0].logprobs
                      for lp in c.choices[0].logprobs.content]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
            return text, tokens, reason

        want, got = stream(server.url), stream(spec.url)
        assert got == want and len(got[1]) > 20
        assert stream(spec.url, stop=["lazy dog. The"]) == stream(server.url, stop=["lazy dog. The"])
        text = httpx.get(f"{spec.url}/metrics").text
        drafts = metric_value(text, "vllm:spec_decode_num_draft_tokens_total", model_name="smol")
        accepted = metric_value(text, "vllm:spec_decode_num_accepted_tokens_total", model_name="smol")
        assert metric_value(text, "vllm:spec_decode_num_drafts_total", model_name="smol") > 0
        assert 0 < accepted <= drafts
        # Fewer engine steps than tokens: each verified step yielded several.
        generated = metric_value(text, "vllm:generation_tokens_total", model_name="smol")
        assert generated - accepted < generated * 0.7
    finally:
        assert spec.terminate() == 0, spec.output()[-2000:]
