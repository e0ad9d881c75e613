"""Small builders shared by tests: engines, requests, HF greedy references, leak checks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tandem.engine.core.request import Request
from tandem.engine.sampling_params import SamplingParams


def save_random_llama(path: Path, vocab_size: int) -> Path:
    """A small Llama (4 layers, hidden 256, 8 heads over 4 KV heads) with random weights, in Hugging Face format.

    The weights are drawn wider than the default init: peaked logits, so greedy picks are not near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.08)
    model.save_pretrained(path)
    return path


def create_request(request_id: str, prompt: list[int], max_tokens: int = 8, block_size: int = 4, **params) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
        eos_token_id=None,
        block_size=block_size,
    )


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers ``generate`` greedy continuation (stops at EOS like the engine does)."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=hf_model.config.eos_token_id,
        )
    return out[0, len(prompt_ids):].tolist()


def assert_engine_idle(engine) -> None:
    """No request left and every KV block back in the pool."""
    pool = engine.kv_manager.pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} blocks leaked"
    assert not engine.kv_manager.req_to_blocks


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
