"""Disaggregation on a GPU: a ``tandem prefill`` and a ``tandem decode`` with their models and KV caches on CUDA
(NIXL moves the blocks between the two processes' GPU memory) give ``tandem serve``'s greedy output on the same GPU.

Skipped where torch sees no CUDA device, as on CI; on a GPU host: ``python -m pytest tests/disagg/test_disagg_cuda.py``.
The model is a small Llama with random weights in Hugging Face format; it has no tokenizer, so prompts are token
ids and outputs are compared as the token ids the server reports in ``logprobs.tokens``.
"""

from __future__ import annotations

import random

import httpx
import pytest
import torch
from disagg_client import kv_metric, metrics
from helpers import save_random_llama
from procs import free_port, start_serve

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT_LENGTHS = (5, 64, 300, 700)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cuda_workers(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("random-llama"), vocab_size=2048)
    common = ("--model", str(path), "--device", "cuda", "--dtype", "float32", "--threads", "4",
              "--kv-cache-memory", "256MiB", "--max-model-len", "1024")
    workers = {role: start_serve(*common, *(() if role == "serve" else ("--kv-port", str(free_port()))), subcommand=role)
               for role in ("serve", "prefill", "decode")}
    yield workers
    for proc in workers.values():
        proc.terminate()


def complete(client: httpx.Client, url: str, body: dict) -> dict:
    r = client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text[:300]
    return r.json()


def test_gpu_prefill_then_gpu_decode_equals_gpu_serve(cuda_workers):
    serve, prefill, decode = (cuda_workers[role].url for role in ("serve", "prefill", "decode"))
    rng = random.Random(0)
    with httpx.Client(timeout=180) as client:
        for n in PROMPT_LENGTHS:
            prompt = [rng.randrange(3, 2048) for _ in range(n)]
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0, "ignore_eos": True}
            expected = complete(client, serve, body)["choices"][0]["logprobs"]["tokens"]
            first = complete(client, prefill, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
            got = complete(client, decode, {**body, "kv_transfer_params": first["kv_transfer_params"]})
            assert got["choices"][0]["logprobs"]["tokens"] == expected, n
        text = metrics(client, decode)
    # Every prompt's blocks, the last partial one too, came over NIXL (the decode side loads the whole prompt).
    assert kv_metric(text, "blocks_total", "decode") == sum(-(-n // 16) for n in PROMPT_LENGTHS)
    assert kv_metric(text, "failures_total", "decode") == 0
