"""Model families beyond Llama: tiny random Qwen3, Gemma 3 and Mistral checkpoints, built here with transformers'
own config classes and saved as safetensors, generate token-identically to transformers (fp32 greedy) across
mixed batches, chunked prefill, prefix-cache hits, speculative verify chunks, and sliding-window layers run well
past their window. Plus the registry's errors and the paged plumbing's window arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_engine_idle, hf_greedy
from tandem import LLM, SamplingParams
from tandem.engine.attention import (
    LayerAttention,
    PagedKVIndexer,
    PrefillSeq,
    attend_fresh_batch,
    first_key_block,
    fresh_prefill_batch,
    window_mask,
)
from tandem.engine.attention.torch_ref import dense_attention
from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.engine.models.registry import ARCHITECTURES, config_from_hf

MAX_NEW = 12
VOCAB = 512
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


def tiny_qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**TINY, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)


def tiny_gemma3():
    # Window 24: not a multiple of the 16-token block, so windows start mid-block. Three local layers, one global.
    # Both softcaps set (Gemma 3's own configs leave them null; supported when a config has them).
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**TINY, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=24,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"],
                            attn_logit_softcapping=8.0, final_logit_softcapping=20.0, pad_token_id=0)


def tiny_mistral():
    from transformers import MistralConfig
    return MistralConfig(**TINY, num_hidden_layers=2, sliding_window=16, tie_word_embeddings=False)


FAMILIES = {"qwen3": tiny_qwen3, "gemma3": tiny_gemma3, "mistral": tiny_mistral}


def prompts_for(seed: int) -> list[list[int]]:
    """Mixed lengths: under one block, under the window, a few windows, many blocks."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 20, 41, 97)]


def save_random(name: str, path):
    """A tiny random model of family ``name``, saved in Hugging Face format at ``path``; returns transformers' model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # Eager attention: transformers' SDPA path does not apply Gemma's attention softcapping.
    hf = AutoModelForCausalLM.from_config(FAMILIES[name](), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for param_name, p in hf.named_parameters():
            p.normal_(0, 0.02 if "norm" in param_name else 0.2)  # peaked logits: greedy picks are not near-ties
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, checkpoint dir, transformers model) for one tiny random family member."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_random(request.param, path)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def test_registry_reads_the_family(family):
    name, path, hf = family
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    assert cfg.architecture == type(hf).__name__
    if name == "gemma3":
        assert cfg.layer_windows == (24, 24, None, 24) and cfg.local_rope_theta == 10_000.0
        assert cfg.rope_theta == 1_000_000.0 and cfg.attn_scale == 24**-0.5 and cfg.qk_norm
        assert cfg.release_window is None  # a global layer needs every key
    elif name == "mistral":
        assert cfg.layer_windows == (16, 16) and cfg.release_window == 16
    else:
        assert cfg.qk_norm and not cfg.qkv_bias and cfg.layer_windows == ()


def test_mixed_batch_chunked_prefill_and_prefix_hits_match_transformers(family):
    name, path, hf = family
    prompts = prompts_for(1)
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    assert max(len(p) + len(e) for p, e in zip(prompts, expected)) > 100  # far past every window
    for budget in (2048, 24):  # one step for the whole batch; then 24-token chunks over cached prefixes
        llm = LLM(model=str(path), dtype="float32", max_model_len=256, num_blocks=96, progress=False,
                  max_num_batched_tokens=budget)
        assert generate(llm, prompts) == expected, f"{name}: max_num_batched_tokens={budget}"
        # Second round: prompts sharing a cached prefix with the first (and one repeated whole).
        shared = [prompts[3][:64] + prompts[0], prompts[3][:33] + prompts[1], prompts[2]]
        hits = llm.engine.kv_manager.prefix_stats.hits
        assert generate(llm, shared) == [hf_greedy(hf, p, MAX_NEW) for p in shared], f"{name}: prefix hits"
        assert llm.engine.kv_manager.prefix_stats.hits > hits
        assert_engine_idle(llm.engine)


def test_speculative_verify_chunks_match_transformers(family):
    name, path, hf = family
    # A repeating prompt gives the n-gram proposer drafts, so verify chunks run (past the window, too).
    base = prompts_for(2)[1]
    prompts = [base * 3, (base * 4)[:70], prompts_for(3)[3]]
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, num_blocks=64, progress=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                  "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    assert generate(llm, prompts) == expected, name
    assert llm.engine.scheduler.num_spec_drafts > 0
    assert_engine_idle(llm.engine)


def test_unknown_architecture_names_it_and_the_supported_list():
    with pytest.raises(ValueError) as err:
        config_from_hf({"architectures": ["PhiForCausalLM"], "model_type": "phi"})
    message = str(err.value)
    assert "PhiForCausalLM" in message
    assert all(arch in message for arch in ARCHITECTURES)


def test_gemma3_hub_spelling_and_multimodal_text_config():
    # Hub configs written before transformers 5: rope_theta/rope_local_base_freq, sliding_window_pattern.
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512, sliding_window_pattern=6,
                query_pre_attn_scalar=16)
    cfg = config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                          "text_config": text, "eos_token_id": [1, 106]})
    assert cfg.layer_windows == (512,) * 5 + (None,)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0} and cfg.local_rope_scaling is None
    assert cfg.vocab_size == 262_208 and cfg.eos_token_id == [1, 106] and cfg.hidden_act == "gelu_tanh"
    assert cfg.weight_prefixes[0] == "model.language_model."
    with pytest.raises(ValueError, match="hidden_activation"):
        config_from_hf({"architectures": ["Gemma3ForCausalLM"], **text, "hidden_activation": "relu"})


def test_sliding_window_tables_skip_blocks_outside_the_window():
    layout = KVCacheLayout(num_layers=2, num_blocks=32, block_size=16, num_kv_heads=2, head_dim=8, dtype="float32")
    indexer = PagedKVIndexer(layout)
    blocks = list(range(10, 20))  # a 160-token sequence's blocks
    assert first_key_block(100, 24, 16) == (100 - 23) // 16 == 4
    full_rows, full_mask = indexer.paged_batch([(blocks, 100)], 1, None)
    rows, mask = indexer.paged_batch([(blocks, 100)], 1, 24)
    per_block = 2 * layout.num_kv_heads
    assert full_rows.shape[1] == 7 * per_block and rows.shape[1] == 3 * per_block  # blocks 4..6 only
    assert rows[0].tolist() == indexer.rows(torch.tensor(blocks[4:7]))[0].tolist()
    assert int(mask.sum()) == 24 and int(full_mask.sum()) == 100  # the query at 99 sees keys 76..99
    seq = indexer.prefill_seq(0, blocks, ctx_len=100, q_len=10, window=24)
    assert seq.kv_start == 64 and seq.gather_rows.shape[1] == 3 * per_block  # first query at 90 sees 67..
    assert indexer.prefill_seq(0, blocks, ctx_len=10, q_len=10, window=24).gather_rows is None


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path):
    # Gemma3ForConditionalGeneration as saved by transformers: the text decoder under a language-model prefix,
    # beside a vision tower the engine must not need. Its text-only greedy output is the reference.
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = tiny_gemma3()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=500,
                          boi_token_index=501, eoi_token_index=502, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.02 if "norm" in name else 0.2)
    hf.save_pretrained(tmp_path)
    prompts = prompts_for(4)
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=256, num_blocks=64, progress=False)
    assert generate(llm, prompts) == [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    assert not any("vision" in name for name, _ in llm.engine.runner.model.named_parameters())


def test_qwen_sliding_window_follows_use_sliding_window_and_max_window_layers():
    base = dict(architectures=["Qwen2ForCausalLM"], **TINY, num_hidden_layers=4, sliding_window=32)
    assert config_from_hf(base).layer_windows == ()  # Qwen2.5's configs: a window, but use_sliding_window false
    cfg = config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 2})
    assert cfg.layer_windows == (None, None, 32, 32) and cfg.windows == (None, 32)


def test_attention_backend_is_chosen_at_start_up_and_logged(caplog):
    with caplog.at_level("INFO", logger="tandem.engine.attention.backend"):
        llm = LLM(model="preset:tiny-gemma3", dtype="float32", max_model_len=64, num_blocks=8, progress=False)
    backend = llm.engine.runner.model.attention_backend
    assert f"attention backend: {backend.name} on cpu" in caplog.text


def test_all_sliding_model_gives_blocks_outside_its_window_back(tmp_path):
    # Mistral (window 16, every layer): two 190-token sequences need 24 blocks between them, and the pool has 17.
    # Released blocks let both run side by side without preemption, holding a few blocks each.
    hf = save_random("mistral", tmp_path)
    prompts = prompts_for(5)[3:] + [prompts_for(6)[3]]
    prompts = [(p * 2)[:150] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    expected = [hf_greedy(hf, p, 40) for p in prompts]
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=256, num_blocks=17, progress=False,
              max_num_batched_tokens=32)
    engine, kv = llm.engine, llm.engine.kv_manager
    assert kv.sliding_window == 16
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    outputs: dict[str, list[int]] = {}
    most_held, both_ran = 0, False
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
        held = [sum(b is not None for b in blocks) for blocks in kv.req_to_blocks.values()]
        most_held = max([most_held, *held])
        both_ran |= len(held) == 2
    assert [outputs[f"r{i}"] for i in range(2)] == expected
    assert both_ran and engine.scheduler.num_preemptions == 0
    assert most_held <= 4  # the window's blocks plus a 32-token chunk's, never the whole sequence
    assert_engine_idle(engine)
    # Released blocks stay in the prefix cache until evicted: the same prompt again hits some of them.
    hits = kv.prefix_stats.hits
    assert generate(llm, prompts[1:]) == [hf_greedy(hf, prompts[1], MAX_NEW)]
    assert kv.prefix_stats.hits > hits
    assert_engine_idle(engine)


def test_padded_fresh_prefill_batch_keeps_the_window_and_softcap():
    # The GPU path attends chunks without a cached prefix as one padded batch; with a window and a softcap it must
    # equal one masked attention per chunk (checked here on the CPU, where the same code runs).
    chunks = [PrefillSeq(0, 21, 21, None), PrefillSeq(21, 5, 5, None), PrefillSeq(26, 40, 40, None)]
    spec = LayerAttention(0, num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3, window=7, softcap=2.0)
    batch = fresh_prefill_batch(chunks, window=7)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(66, heads, 8, generator=gen) for heads in (4, 2, 2))
    got = torch.zeros(66, 4, 8)
    attend_fresh_batch(q, k, v, batch, got, spec)
    for c in chunks:
        rows = slice(c.q_start, c.q_start + c.q_len)
        pos = torch.arange(c.q_len)
        mask = window_mask(pos.view(1, -1), pos.view(-1, 1), 7)
        qs, ks, vs = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        expected = dense_attention(qs, ks, vs, mask, spec)[0].transpose(0, 1)
        torch.testing.assert_close(got[rows], expected)
    # The window bites: the full causal mask gives a different answer for the long chunk.
    full = LayerAttention(0, 4, 2, 8, 0.3, None, 2.0)
    qs, ks, vs = (t[26:66].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    assert not torch.allclose(dense_attention(qs, ks, vs, None, full, causal=True)[0].transpose(0, 1), got[26:66])


def test_generation_config_end_of_turn_ids_stop_a_request(tmp_path):
    """Gemma 3 instruct ends a turn with <end_of_turn>, listed only in generation_config.json: it must stop."""
    save_random("gemma3", tmp_path)
    end_of_turn = 106
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, end_of_turn]}))
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=128, num_blocks=32, progress=False)
    forced = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logit_bias={end_of_turn: 100.0})
    out = llm.generate([{"prompt_token_ids": prompts_for(4)[1]}], forced)[0].outputs[0]
    assert out.token_ids[-1] == end_of_turn and len(out.token_ids) == 1 and out.finish_reason == "stop"
    # ignore_eos runs through it, as for the tokenizer's own EOS.
    free = forced.clone(ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompts_for(4)[1]}], free)[0].outputs[0]
    assert len(out.token_ids) == MAX_NEW and out.finish_reason == "length"
    assert_engine_idle(llm.engine)
