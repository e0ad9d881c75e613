"""The engine on a CUDA device (plain torch attention): greedy output equals transformers' on the same GPU.

Skipped where torch sees no CUDA device, as on CI; on a GPU host: ``python -m pytest tests/engine/test_cuda.py``.
The model is a small Llama with random weights saved in Hugging Face format (nothing is downloaded), loaded by
both the engine and transformers.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_engine_idle, save_random_llama
from tandem import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_NEW = 8
PROMPT_LENGTHS = (5, 17, 64, 200, 700)  # one block or less up to 44 blocks; 700 takes three 256-token chunks


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("random-llama"), vocab_size=1024)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def hf_greedy_on_cuda(llama_dir, prompts, **generate_kwargs) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).to("cuda").eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=2, **generate_kwargs)
            out.append(gen[0, len(p):].tolist())
    del hf
    torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def expected(llama_dir, prompts):
    return hf_greedy_on_cuda(llama_dir, prompts)


def test_cuda_greedy_matches_transformers_batched_chunked_and_cached(llama_dir, prompts, expected):
    llm = LLM(model=str(llama_dir), dtype="float32", device="cuda", max_model_len=1024, num_blocks=256,
              max_num_batched_tokens=256, progress=False)
    assert llm.engine.runner.kv_buffer.is_cuda
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for _ in range(2):  # the second pass hits the prefix cache for every full block of every prompt
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
        assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.kv_manager.prefix_stats.hits > 0
    assert_engine_idle(llm.engine)


def test_cuda_sampling_and_logprobs_run_on_the_host(llama_dir, prompts):
    llm = LLM(model=str(llama_dir), dtype="bfloat16", device="cuda", max_model_len=1024, num_blocks=128,
              progress=False)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, logprobs=2, prompt_logprobs=1, seed=3,
                            ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[1]}], params)[0]
    again = llm.generate([{"prompt_token_ids": prompts[1]}], params)[0]
    assert len(first.outputs[0].token_ids) == 6
    assert first.outputs[0].token_ids == again.outputs[0].token_ids  # seeded: reproducible
    assert len(first.prompt_logprobs) == len(prompts[1])
    assert_engine_idle(llm.engine)


def test_cuda_greedy_with_penalty_and_logprobs_samples_on_the_device(llama_dir, prompts):
    # Greedy rows are sampled where the logits are; the repetition penalty then indexes them on the GPU.
    expected = hf_greedy_on_cuda(llama_dir, prompts[:3], repetition_penalty=1.3)
    llm = LLM(model=str(llama_dir), dtype="float32", device="cuda", max_model_len=1024, num_blocks=128,
              progress=False)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=1, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o in outs:
        for token, entry in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True):
            assert token in entry and entry[token] <= 0.0
    assert_engine_idle(llm.engine)
