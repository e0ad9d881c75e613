"""The native decoder stack (``tandem/engine/ops/csrc/decoder_cpu.cpp``): every layer of a decode-only step in one
call. It must give the Python layers' hidden states and KV writes bit for bit (the same kernels in the same order),
on the real model with ragged batches, and on a Qwen2 checkpoint (q/k/v bias); families it does not know keep their
layers, with the reason logged."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from tandem import LLM, SamplingParams

VOCAB = 512


def compare_decode_steps(llm: LLM) -> list[int]:
    """Make every decode-only step of ``llm`` run both paths (the layers on a copy of the KV cache first) and
    assert equal hidden states and caches; returns the batch size of each step compared."""
    model = llm.engine.runner.model
    native = model.native_decoder
    assert native is not None
    forward = model.forward
    compared = []

    def both(input_ids, positions, kv_buffer, meta):
        if meta.num_decode != input_ids.shape[0]:
            return forward(input_ids, positions, kv_buffer, meta)
        kv_layers = kv_buffer.clone()
        model.native_decoder = None
        try:
            want = forward(input_ids, positions, kv_layers, meta)
        finally:
            model.native_decoder = native
        got = forward(input_ids, positions, kv_buffer, meta)
        assert torch.equal(got, want), f"hidden states differ at batch {input_ids.shape[0]}"
        assert torch.equal(kv_buffer, kv_layers), f"KV writes differ at batch {input_ids.shape[0]}"
        compared.append(input_ids.shape[0])
        return got

    model.forward = both
    return compared


def test_real_model_decode_steps_equal_the_layers_bit_for_bit(smol_dir, caplog):
    caplog.set_level(logging.INFO, logger="tandem.engine.model_runner")
    llm = LLM(model=str(smol_dir), dtype="bfloat16", num_blocks=160, max_model_len=1024, enable_prefix_caching=False,
              max_num_batched_tokens=256, progress=False)
    assert any("decode steps: every layer in one native call" in r.getMessage() for r in caplog.records)
    compared = compare_decode_steps(llm)
    gen = torch.Generator().manual_seed(3)
    # Contexts under one block to several hundred tokens; different lengths, so the batch shrinks as they finish.
    prompts = [{"prompt_token_ids": torch.randint(100, 40000, (n,), generator=gen).tolist()}
               for n in (3, 17, 40, 130, 300)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 30, 14, 22, 5)]
    outputs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [9, 30, 14, 22, 5]
    assert len(compared) >= 20 and {1, 2, 3} <= set(compared) and max(compared) >= 4


def test_the_kv_prefetch_changes_no_output_up_to_and_past_its_budget(smol_dir, cpu_ops):
    """Each layer's MLP prefetches the next layer's KV rows (at most 3 MiB a thread): two sequences, one per
    thread, the first past that bound (~3.1 MB of KV a layer), the second under it; decode steps equal the layers'
    with the prefetch on, and the same tokens come out with it off. (On by default unless the products run on AMX
    tiles, where it made decode steps slower; switched on here either way.)"""
    llm = LLM(model=str(smol_dir), dtype="bfloat16", num_blocks=560, max_model_len=4400, enable_prefix_caching=False,
              max_num_batched_tokens=2048, num_threads=2, progress=False)
    stack = llm.engine.runner.model.native_decoder.stack
    assert stack.kv_prefetch is (not cpu_ops.module.linear_amx())
    stack.kv_prefetch = True
    gen = torch.Generator().manual_seed(11)
    prompts = [{"prompt_token_ids": torch.randint(100, 40000, (n,), generator=gen).tolist()} for n in (4200, 900)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    compared = compare_decode_steps(llm)
    with_prefetch = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert compared == [2, 2, 2]
    stack.kv_prefetch = False
    assert stack.kv_prefetch is False
    without = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert without == with_prefetch and all(len(t) == 4 for t in without)


def save_tiny(tmp_path, name: str):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                  num_key_value_heads=1, num_hidden_layers=3, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2)
    config = {"qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
              "qwen3": lambda: Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
              "mistral": lambda: MistralConfig(**common, sliding_window=16)}[name]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, p in hf.named_parameters():
            p.normal_(0, 0.02 if "norm" in param_name else 0.2)
    hf.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_bias_and_qk_norms_decode_natively_bit_for_bit(tmp_path, family):
    """Qwen2's q/k/v bias and Qwen3's per-head q/k norms (the fused kernel at one sequence, torch ops above)."""
    llm = LLM(model=str(save_tiny(tmp_path, family)), dtype="bfloat16", num_blocks=64, max_model_len=512,
              enable_prefix_caching=False, progress=False)
    attn = llm.engine.runner.model.layers[0].self_attn
    assert (attn.qkv_proj.bias is not None) == (family == "qwen2") and (attn.q_norm is not None) == (family == "qwen3")
    compared = compare_decode_steps(llm)
    gen = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist()} for n in (4, 19, 50)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (40, 6, 3)]
    llm.generate(prompts, params)
    assert len(compared) >= 11 and {1, 2, 3} <= set(compared)


@pytest.mark.parametrize(("family", "reason"), [("mistral", "sliding-window layers")])
def test_layers_the_stack_does_not_know_stay_in_python_with_the_reason_logged(tmp_path, caplog, family, reason):
    caplog.set_level(logging.INFO, logger="tandem.engine.model_runner")
    llm = LLM(model=str(save_tiny(tmp_path, family)), dtype="bfloat16", num_blocks=64, max_model_len=512,
              progress=False)
    assert llm.engine.runner.model.native_decoder is None
    assert any(f"decode steps: layer by layer ({reason})" in r.getMessage() for r in caplog.records)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0.0, max_tokens=6,
                                                                             ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6


def test_the_stack_refuses_a_capsule_that_is_not_the_attention_kernels(cpu_ops):
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype, new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    other = new_capsule(1, b"something.else", None)
    with pytest.raises(RuntimeError, match="attention must be the paged-attention extension's decode_attention"):
        cpu_ops.module.DecoderStack([], 2, 1, 32, 64, 128, 1e-5, 0.17, other)
