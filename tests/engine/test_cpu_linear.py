"""Tandem's bf16 CPU linear (``tandem/engine/ops/csrc/linear_cpu.cpp``) against the exact product: every output
within one bf16 rounding of the fp32 sum, for row counts on and off its 6-row tiles, widths on and off its
64-column blocks, with and without bias; ``PackedLinear`` takes it with the fused ops and oneDNN without.

Every test runs on both paths of the kernel where the CPU has AMX: the AVX-512 products and the tile unit's (which
takes products of 4 or more rows there); on other CPUs the AMX runs are skipped."""

from __future__ import annotations

import pytest
import torch
from helpers import torch_threads
from torch import nn

from tandem.engine.models.common import PackedLinear


@pytest.fixture(scope="module")
def ops(cpu_ops):
    return cpu_ops


@pytest.fixture(autouse=True, params=["avx512", "amx"])
def products(request, cpu_ops):
    """The kernel's path for the test: AMX tiles or AVX-512 only (restored after)."""
    module = cpu_ops.module
    if request.param == "amx" and not module.linear_amx_available():
        pytest.skip("this CPU gives no AMX tiles")
    before = module.linear_amx()
    module.set_linear_amx(request.param == "amx")
    yield request.param
    module.set_linear_amx(before)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def linear(n: int, k: int, bias: bool, seed: int) -> nn.Linear:
    layer = nn.Linear(k, n, bias=bias).to(torch.bfloat16).requires_grad_(False)
    layer.weight.copy_(rand(n, k, seed=seed) * 0.05)
    if bias:
        layer.bias.copy_(rand(n, seed=seed + 1))
    return layer


def exact(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it (plus fp32 summation)."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.double() - want).abs()
    bound = want.abs() * 2.0**-8 + 1e-3 * want.abs().max()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 24, 25, 33, 130])
@pytest.mark.parametrize("n, k", [(960, 576), (100, 34), (64, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_the_product_rounded_once(ops, rows, n, k, bias):
    layer = linear(n, k, bias, seed=rows * 7 + n)
    x = rand(rows, k, seed=rows)
    got = PackedLinear(layer, ops)(x)
    within_one_rounding(got, exact(x, layer))


@pytest.mark.parametrize("rows", [1, 32, 50])
def test_packed_linear_is_the_same_on_any_number_of_threads(ops, rows):
    """Work items go to the threads in ranges with stealing (``csrc/parallel.h``): each is computed once, in the same
    order of products whichever thread takes it, so the output is bit-identical for 1, 2, 3 and 5 threads."""
    layer = linear(576, 576, False, seed=rows)
    x = rand(rows, 576, seed=rows + 1)
    packed = PackedLinear(layer, ops)
    outs = []
    for threads in (1, 2, 3, 5):
        with torch_threads(threads):
            outs.append(packed(x))
    within_one_rounding(outs[0], exact(x, layer))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_packed_linear_takes_batched_and_strided_inputs(ops):
    layer = linear(192, 64, True, seed=3)
    x = rand(3, 5, 128, seed=4)[..., ::2]  # [3, 5, 64], not contiguous
    packed = PackedLinear(layer, ops)
    assert packed.ops is ops
    got = packed(x)
    assert got.shape == (3, 5, 192)
    within_one_rounding(got, exact(x, layer))
    assert packed(rand(0, 64, seed=5)).shape == (0, 192)


def test_packed_linear_agrees_with_onednns(ops):
    """Both round the same fp32 sums; they may differ in the order of additions, never by more than a rounding."""
    layer = linear(576, 1536, False, seed=9)
    x = rand(17, 1536, seed=10)
    ours, onednn = PackedLinear(layer, ops), PackedLinear(layer)
    assert onednn.ops is None
    torch.testing.assert_close(ours(x).float(), onednn(x).float(), rtol=2**-7, atol=1e-2)


def test_products_after_another_librarys_amx_kernels(ops):
    """oneDNN's bf16 products take the tile unit too, and leave it released (TILERELEASE) or in shapes of their own: a
    product after one reloads its tile shapes (before it did, the next AMX product faulted: SIGILL, the whole
    process). Alternates the two on the same thread, over the row counts that take each of the kernel's shapes."""
    for rows in (4, 16, 33, 130, 7, 64):
        layer = linear(960, 576, False, seed=rows)
        x = rand(rows, 576, seed=rows + 3)
        ours, onednn = PackedLinear(layer, ops), PackedLinear(layer)
        onednn(x)
        within_one_rounding(ours(x), exact(x, layer))
        onednn(x)
        within_one_rounding(ours(x), exact(x, layer))


def test_shapes_the_kernel_does_not_take(ops):
    """An odd K keeps oneDNN's linear; a mismatched weight or a non-bf16 input is refused by name."""
    odd = linear(64, 33, False, seed=11)
    packed = PackedLinear(odd, ops)
    assert packed.ops is None
    within_one_rounding(packed(rand(4, 33, seed=12)), exact(rand(4, 33, seed=12), odd))
    weight = ops.pack_linear_weight(rand(64, 32, seed=13))
    with pytest.raises(RuntimeError, match="packed_linear: the packed weight does not match x"):
        ops.packed_linear(rand(2, 34, seed=14), weight, 64, None)
    with pytest.raises(RuntimeError, match="packed_linear: x must be contiguous bf16"):
        ops.packed_linear(torch.ones(2, 32), weight, 64, None)
    with pytest.raises(RuntimeError, match="pack_linear_weight: K must be even"):
        ops.pack_linear_weight(rand(64, 33, seed=15))


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 24, 25, 32, 33, 100, 130, 600])
@pytest.mark.parametrize("inter, k", [(1536, 576), (32, 34), (96, 64)])
def test_the_gated_product_is_linear_then_silu_mul_bit_for_bit(ops, rows, inter, k):
    """``packed_linear_silu_mul`` applies silu(gate) * up as it stores the product's columns: the same bits as the
    plain product of [gate; up] followed by ``silu_mul``, for row counts on and off the tiles (on AMX, 100 rows: a
    64-row item and one of 32 + 4; 600: panels of 512 rows) and an odd count of 32-column blocks (96)."""
    weight = rand(2 * inter, k, seed=rows + inter) * 0.3  # gate values across silu's range, both signs
    x = rand(rows, k, seed=rows * 3 + k)
    want = ops.silu_mul(ops.packed_linear(x, ops.pack_linear_weight(weight), 2 * inter, None))
    got = ops.packed_linear_silu_mul(x, ops.pack_gated_weight(weight), inter)
    assert got.shape == (rows, inter) and torch.equal(got, want)
    assert bool((got != 0).any()) and bool((want < 0).any())


def test_packed_gated_linear_module_and_its_refusals(ops):
    """``PackedGatedLinear`` takes rows of any leading shape; a width that is not two multiples of 32, or a weight
    packed the plain way, is refused by name."""
    from tandem.engine.models.common import PackedGatedLinear

    layer = linear(128, 64, False, seed=21)
    gated = PackedGatedLinear(layer, ops)
    x = rand(2, 3, 64, seed=22)
    want = ops.silu_mul(ops.packed_linear(x.reshape(6, 64), ops.pack_linear_weight(layer.weight), 128, None))
    assert torch.equal(gated(x), want.view(2, 3, 64))
    assert not PackedGatedLinear.applies(linear(96, 64, False, seed=23), ops)  # I = 48
    assert not PackedGatedLinear.applies(linear(128, 64, True, seed=24), ops)  # a bias
    with pytest.raises(RuntimeError, match="pack_gated_weight: \\[2I, K\\] with I a multiple of 32"):
        ops.pack_gated_weight(rand(96, 64, seed=25))
    with pytest.raises(RuntimeError, match="packed_linear_silu_mul: the packed weight is not a gated"):
        ops.packed_linear_silu_mul(rand(2, 64, seed=26), ops.pack_linear_weight(rand(192, 64, seed=27)), 64)
