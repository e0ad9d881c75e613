"""Greedy output of tandem.LLM equals transformers' generate, token for token (float32)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_engine_idle, hf_greedy
from tandem import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 8
TEXT = (
    "The river runs through the old town, past the market and the cathedral, where merchants once traded "
    "wool, salt and spices from distant ports. "
)


def smol_prompts(tokenizer) -> list[list[int]]:
    """Eight prompts from 5 to 1,500 tokens (chat-templated and raw)."""
    long_ids = tokenizer(TEXT * 60)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                         add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    prompts = [tokenizer("Paris is the capital of")["input_ids"], chat]
    prompts += [long_ids[:n] for n in (17, 64, 200, 511, 900, 1500)]
    assert min(map(len, prompts)) >= 5 and max(map(len, prompts)) == 1500
    return prompts


@pytest.fixture(scope="module")
def smol_llm(smol_dir):
    return LLM(model=str(smol_dir), dtype="float32", max_model_len=2048, num_blocks=400, progress=False)


@pytest.fixture(scope="module")
def references(hf_smol, smol_tokenizer):
    prompts = smol_prompts(smol_tokenizer)
    return prompts, [hf_greedy(hf_smol, p, MAX_NEW) for p in prompts]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def generate_ids(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def test_batched_greedy_matches_transformers(smol_llm, references):
    prompts, expected = references
    assert generate_ids(smol_llm, prompts) == expected
    assert_engine_idle(smol_llm.engine)


def test_prefix_cache_hits_keep_output_identical(smol_llm, references):
    prompts, expected = references
    before = smol_llm.engine.kv_manager.prefix_stats.hits
    outs = smol_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert smol_llm.engine.kv_manager.prefix_stats.hits > before
    assert outs[-1].num_cached_tokens >= 1488  # the 1,500-token prompt came almost entirely from cache
    assert_engine_idle(smol_llm.engine)


def test_small_chunks_and_staggered_arrivals(smol_dir, references):
    prompts, expected = references
    llm = LLM(model=str(smol_dir), dtype="float32", max_model_len=2048, num_blocks=400, progress=False,
              max_num_batched_tokens=48, enable_prefix_caching=False)
    engine = llm.engine
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:  # a new request arrives every third step, mid-batch
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        steps += 1
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == expected
    assert_engine_idle(engine)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_tiny_random_models_match_transformers(tmp_path, preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tandem.engine.models.registry import PRESETS

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**{k: v for k, v in PRESETS[preset].items() if k != "architectures"})
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    assert (preset == "tiny-qwen2") == any("bias" in n for n, _ in hf.named_parameters())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 16, 33, 120, 300)]
    expected = [hf_greedy(hf, p, 10) for p in prompts]
    for chunk in (2048, 24):
        llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=1024, num_blocks=200, progress=False,
                  max_num_batched_tokens=chunk)
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10))
        assert [o.outputs[0].token_ids for o in got] == expected, f"chunk={chunk}"
        assert_engine_idle(llm.engine)
