"""Speculative decoding (n-gram prompt lookup): proposals, exact greedy output, sampling distribution."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_engine_idle
from tandem import LLM, SamplingParams
from tandem.engine.config import SpeculativeConfig
from tandem.engine.core.request import Request
from tandem.engine.sampler import Sampler
from tandem.engine.spec_decode import propose_ngram

COPY_PROMPT = [{"role": "user", "content": "Copy this text exactly, word for word:\n\n"
                + "The quick brown fox jumps over the lazy dog. " * 3
                + "\nA journey of a thousand miles begins with a single step. Knowledge is power. Time is money."}]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def test_propose_ngram_copies_what_followed_the_latest_longest_match():
    # The last 2 tokens (3, 4) occurred twice before; the latest occurrence wins.
    assert propose_ngram([1, 3, 4, 9, 9, 3, 4, 7, 8, 5, 3, 4], k=3, n_min=2, n_max=3) == [7, 8, 5]
    # A longer suffix match (2, 3, 4) beats a later shorter one.
    assert propose_ngram([2, 3, 4, 6, 6, 3, 4, 1, 2, 3, 4], k=2, n_min=2, n_max=3) == [6, 6]
    # Capped at k, and at the end of the sequence.
    assert propose_ngram([5, 6, 7, 5, 6], k=10, n_min=2, n_max=2) == [7, 5, 6]
    # The suffix itself is not a match; too short or no match -> nothing.
    assert propose_ngram([1, 2, 3, 4], k=3, n_min=2, n_max=4) == []
    assert propose_ngram([7], k=3, n_min=1, n_max=1) == []
    assert propose_ngram([4, 4, 4], k=2, n_min=1, n_max=1) == [4]  # what followed the latest earlier 4


def test_speculative_config_is_validated():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=3)
    with pytest.raises(ValueError, match="unknown field"):
        SpeculativeConfig.from_dict({"method": "ngram", "draft_model": "x"})


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever the draft, the first token verify() returns is distributed as the target probabilities."""
    target = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05])
    logits = target.log().repeat(2, 1)  # [drafts + 1, V]
    sampler = Sampler(vocab_size=5, seed=123)
    request = Request("r", [1, 2, 3], SamplingParams(temperature=1.0, max_tokens=8))
    trials = 20_000
    for draft in (1, 4):  # a likely and an unlikely draft
        counts = torch.zeros(5)
        accepted = 0
        for _ in range(trials):
            tokens = sampler.verify(logits, request, [draft]).token_ids
            counts[tokens[0]] += 1
            accepted += tokens[0] == draft and len(tokens) == 2
        freq = counts / trials
        assert torch.allclose(freq, target, atol=0.015), (draft, freq)
        # A draft is accepted exactly as often as the target gives it mass.
        assert abs(accepted / trials - float(target[draft])) < 0.015


@pytest.fixture(scope="module")
def llms(smol_dir):
    common = dict(model=str(smol_dir), dtype="float32", max_model_len=1024, num_blocks=200, progress=False)
    return LLM(**common), LLM(**common, speculative_config=SPEC)


@pytest.mark.slow
def test_greedy_output_is_identical_with_speculation(llms):
    plain, spec = llms
    prompts = [COPY_PROMPT, [{"role": "user", "content": "Write a haiku about the sea."}]]
    for max_tokens in (1, 2, 7, 120):  # short limits cap the drafts at the max_tokens boundary
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        want = [o.outputs[0] for o in plain.chat(prompts, params)]
        got = [o.outputs[0] for o in spec.chat(prompts, params)]
        assert [g.token_ids for g in got] == [w.token_ids for w in want], max_tokens
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
        assert [g.text for g in got] == [w.text for w in want]
    stats = spec.engine.stats()
    assert stats.spec_num_drafts > 0
    # The copy task is what prompt lookup is for: most drafts are right.
    assert stats.spec_num_accepted_tokens > 0.5 * stats.spec_num_draft_tokens
    assert_engine_idle(spec.engine)


@pytest.mark.slow
def test_a_batch_verified_together_is_identical_to_plain_decoding(llms):
    """Eight sequences of different lengths speculate at once: their verify chunks (of different lengths, over
    different contexts) are attended in batched groups, and greedy output still matches plain decoding."""
    plain, spec = llms
    passages = ["The quick brown fox jumps over the lazy dog.", "Knowledge is power. Time is money.",
                "To reset the router, hold the power button for ten seconds."]
    prompts = [[{"role": "user", "content": f"Copy this text exactly:\n\n{' '.join(passages[: 1 + i % 3] * (1 + i % 4))}"}]
               for i in range(6)]
    prompts += [[{"role": "user", "content": "Write a haiku about the sea."}],
                [{"role": "user", "content": "List the first ten prime numbers."}]]
    params = SamplingParams(temperature=0, max_tokens=48)
    drafts_before = spec.engine.stats().spec_num_drafts
    want = [o.outputs[0].token_ids for o in plain.chat(prompts, params)]
    got = [o.outputs[0].token_ids for o in spec.chat(prompts, params)]
    assert got == want
    assert spec.engine.stats().spec_num_drafts - drafts_before >= 8
    assert_engine_idle(spec.engine)


@pytest.mark.slow
def test_speculation_honours_stops_logprobs_and_sampling(llms):
    plain, spec = llms
    # A stop string and a stop token inside an accepted run end the output where plain decoding does.
    for params in (SamplingParams(temperature=0, max_tokens=100, stop=["dog. The quick brown fox"]),
                   SamplingParams(temperature=0, max_tokens=100, stop_token_ids=[690], min_tokens=8),
                   SamplingParams(temperature=0, max_tokens=40, logprobs=2)):
        want = plain.chat(COPY_PROMPT, params)[0].outputs[0]
        got = spec.chat(COPY_PROMPT, params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert got.finish_reason == "stop" if not params.logprobs else True
        if params.logprobs:
            assert len(got.logprobs) == len(got.token_ids)
            for token, entry, ref in zip(got.token_ids, got.logprobs, want.logprobs):
                assert token in entry and len(entry) >= 2
                assert entry[token] == pytest.approx(ref[token], abs=1e-3)
    # Sampled: seeded runs repeat themselves and respect max_tokens; penalties switch speculation off.
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=30)
    first, second = (spec.chat(COPY_PROMPT, seeded)[0].outputs[0].token_ids for _ in range(2))
    assert first == second and 0 < len(first) <= 30
    before = spec.engine.stats().spec_num_drafts
    penalised = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3)
    assert (spec.chat(COPY_PROMPT, penalised)[0].outputs[0].token_ids
            == plain.chat(COPY_PROMPT, penalised)[0].outputs[0].token_ids)
    assert spec.engine.stats().spec_num_drafts == before
    assert_engine_idle(spec.engine)
