"""The fused CPU kernels (``tandem/engine/ops/csrc/fused_cpu.cpp``) against the torch ops they replace: equal to
fp32 rounding in fp32, within one bf16 rounding in bf16; bad shapes refused with the argument named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.engine.models.common import RMSNorm, apply_rope, rope_inv_freq


@pytest.fixture(scope="module")
def ops(cpu_ops):
    return cpu_ops


def rand(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # the same value up to one bf16 rounding step (fused: one rounding where torch rounds twice)
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_residual_add(ops, dtype):
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(rand(576, dtype=torch.float32, seed=1))
    norm = norm.to(dtype)
    x, residual = rand(37, 576, dtype=dtype, seed=2), rand(37, 576, dtype=dtype, seed=3)
    close(ops.rms_norm(x, norm.weight, norm.eps), norm(x))
    want_sum = residual + x
    want = norm(want_sum)
    got = ops.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(residual, want_sum)  # added in place, rounded as `h + x` rounds
    close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_in_place_on_projection_views(ops, dtype, head_dim):
    """q and k are views into one fused qkv projection (strided tokens), rotated in place."""
    T, hq, hk = 13, 9, 3
    qkv = rand(T, (hq + 2 * hk) * head_dim, dtype=dtype, seed=4)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    q, k = q.view(T, hq, head_dim), k.view(T, hk, head_dim)
    positions = torch.arange(100, 100 + T)
    freqs = positions.float().unsqueeze(1) * rope_inv_freq(10000.0, head_dim, None).unsqueeze(0)
    cos, sin = freqs.cos(), freqs.sin()
    want_q = apply_rope(q.float(), cos.unsqueeze(1), sin.unsqueeze(1))
    want_k = apply_rope(k.float(), cos.unsqueeze(1), sin.unsqueeze(1))
    ops.rope_(q, k, cos, sin)
    close(q, want_q.to(dtype))
    close(k, want_k.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(ops, dtype):
    gate_up = rand(21, 2 * 1536, dtype=dtype, seed=5)
    gate, up = gate_up.split(1536, dim=-1)
    close(ops.silu_mul(gate_up), F.silu(gate) * up)
    extreme = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0] * 16 + [1.0] * 80], dtype=dtype)
    got = ops.silu_mul(torch.cat([extreme[:, :80], torch.ones(1, 80, dtype=dtype)], dim=1))
    assert torch.isfinite(got).all()
    close(got, F.silu(extreme[:, :80]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 16, 49152, 49155])
def test_argmax_rows_picks_what_torch_picks(ops, n, dtype):
    x = rand(33, n, dtype=torch.float32, seed=n).round(decimals=1).to(dtype)  # many equal maxima: the first wins
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    x[1] = float("-inf")  # every token banned: torch answers index 0
    x[2, n // 2:] = float("inf")
    x[3, n // 3] = float("nan")  # a NaN wins wherever it is
    if n > 2:
        x[4, -1] = float("nan")
        x[4, 1] = float("nan")
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    assert ops.argmax_rows(torch.empty(0, n, dtype=dtype)).shape == (0,)
    # Rows sliced out of wider ones (a padded LM head's vocabulary), read in place.
    wide = rand(9, n + 37, dtype=torch.float32, seed=n + 1).to(dtype)
    wide[:, n:] = 100.0  # the padding would win if it were read
    assert torch.equal(ops.argmax_rows(wide[:, :n]), wide[:, :n].argmax(dim=-1))


def test_bad_shapes_are_refused(ops):
    with pytest.raises(RuntimeError, match="rms_norm: last dimension a multiple of 16"):
        ops.rms_norm(torch.ones(2, 10), torch.ones(10), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: residual must match x"):
        ops.rms_norm(torch.ones(2, 16), torch.ones(16), 1e-5, torch.ones(3, 16))
    with pytest.raises(RuntimeError, match="rope: cos, sin"):
        ops.rope_(torch.ones(2, 1, 64), torch.ones(2, 1, 64), torch.ones(2, 16), torch.ones(2, 16))
    with pytest.raises(RuntimeError, match="silu_mul: bf16 or fp32 only"):
        ops.silu_mul(torch.ones(2, 64, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="argmax_rows: expected fp32 or bf16"):
        ops.argmax_rows(torch.ones(2, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="argmax_rows: expected fp32 or bf16"):
        ops.argmax_rows(torch.ones(64, 2).t())  # columns not adjacent


def test_real_model_fp32_greedy_identical_with_fused_ops(smol_dir, smol_tokenizer):
    """The native CPU path (operators + fused kernels) in fp32 gives the torch reference path's greedy tokens."""
    from tandem import LLM, SamplingParams

    from test_correctness import smol_prompts

    prompts = smol_prompts(smol_tokenizer)[:6]
    common = dict(model=str(smol_dir), dtype="float32", max_model_len=2048, num_blocks=400, progress=False)
    outs = {}
    for name in ("torch", "cpu-paged"):
        llm = LLM(**common, attention_backend=name)
        assert (llm.engine.runner.model.layers[0].mlp.fused is not None) == (name == "cpu-paged")
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=24))
        outs[name] = [o.outputs[0].token_ids for o in got]
    assert outs["cpu-paged"] == outs["torch"]


def test_modules_keep_their_torch_ops_where_the_kernels_do_not_apply(ops):
    """A width that is not a multiple of 16, or non-contiguous rows: the module's torch code, same result."""
    norm = RMSNorm(24, 1e-6)
    x = rand(5, 24, dtype=torch.float32, seed=7)
    want = norm(x)
    norm.fused = ops
    torch.testing.assert_close(norm(x), want)
    wide = RMSNorm(32, 1e-6)
    strided = rand(5, 64, dtype=torch.float32, seed=8)[:, :32]
    want = wide(strided)
    wide.fused = ops
    torch.testing.assert_close(wide(strided), want)
    got, summed = wide.add_norm(strided, strided.contiguous())
    torch.testing.assert_close(got, RMSNorm(32, 1e-6)(strided + strided))


def test_greedy_batches_are_picked_on_the_lm_heads_own_rows(ops):
    """A batch asking only for argmaxes is picked on the bf16 logits as they come (the padded vocabulary's columns
    skipped); any request asking more (here a logit bias, logprobs, a min_tokens ban) sends the batch through the
    fp32 path, which still applies it."""
    from tandem import SamplingParams
    from tandem.engine.core.request import Request
    from tandem.engine.sampler import Sampler

    vocab = 1000
    logits = rand(6, vocab + 24, dtype=torch.float32, seed=7).to(torch.bfloat16)
    logits[:, vocab:] = 50.0  # padding columns: never a token
    seen: list[torch.dtype] = []

    def argmax_rows(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return ops.argmax_rows(x)

    sampler = Sampler(vocab, argmax_rows=argmax_rows)
    plain = [Request(f"r{i}", [1, 2], SamplingParams(temperature=0.0, max_tokens=4)) for i in range(6)]
    expected = logits[:, :vocab].float().argmax(dim=-1).tolist()
    result = sampler.sample(logits, plain)
    assert result.token_ids == expected and result.logprobs == [None] * 6
    assert seen == [torch.bfloat16]  # no fp32 copy was made

    banned = expected[2]
    asks_more = [Request("bias", [1, 2], SamplingParams(temperature=0.0, max_tokens=4, logit_bias={banned: -100})),
                 Request("lp", [1, 2], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)),
                 Request("min", [1, 2], SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2,
                                                       stop_token_ids=[expected[4]]))]
    rows = logits[[2, 3, 4]]
    result = sampler.sample(rows, asks_more)
    assert result.token_ids[0] != banned
    assert result.token_ids[1] == expected[3] and set(result.logprobs[1]) >= {expected[3]}
    assert result.token_ids[2] != expected[4]
