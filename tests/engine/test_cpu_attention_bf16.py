"""The CPU bf16 attention kernels against the torch reference run in fp32 on the same bf16 values.

Prefill (``csrc/prefill_attention_cpu.cpp``): ragged chunks (shorter than a tile, not tile-aligned, longer than
several), GQA groups, head sizes 64-256, sliding windows, softcapping, chunks over a cached prefix in scattered blocks,
a whole step through ``forward``. Decode (the bf16 path of ``csrc/paged_attention_cpu.cpp``): ragged contexts,
windows, softcapping, long contexts split across threads, and never-written cache slots (NaN) beside the keys.

Where the CPU has AMX, every test runs with the prefill kernels on the tile unit and on AVX-512 only."""

from __future__ import annotations

import pytest
import torch
from helpers import torch_threads

from tandem.engine.attention import AttentionMetadata, LayerAttention, PagedKVIndexer, PagedReads, TorchReferenceBackend
from tandem.engine.attention.torch_ref import paged_attention as reference_paged_attention
from tandem.engine.core.kv_layout import KVCacheLayout

BS = 16
# bf16 inputs, fp32 accumulation in both; the kernel rounds probabilities to bf16 for the value products.
TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def backend():
    from tandem.engine.attention.cpu_paged import CpuPagedBackend
    from tandem.engine.ops.build import OperatorBuildError

    try:
        backend = CpuPagedBackend.create()
    except OperatorBuildError as exc:  # the test machine has g++ and ninja: a failed build is a failure
        pytest.fail(str(exc))
    if not backend.bf16_prefill:
        pytest.skip("this CPU has no AVX-512 bf16: the prefill kernels are not built")
    return backend


@pytest.fixture(autouse=True, params=["avx512", "amx"])
def tiles(request, backend):
    """The prefill kernels' path for the test: AMX tiles or AVX-512 only (restored after)."""
    from tandem.engine.attention import cpu_paged

    module = cpu_paged._extension
    before = module.attention_amx()
    if request.param == "amx":
        try:
            module.set_attention_amx(True)
        except RuntimeError:
            pytest.skip("this CPU gives no AMX tiles")
    else:
        module.set_attention_amx(False)
    yield request.param
    module.set_attention_amx(before)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def layout_and_cache(heads: tuple[int, int, int], blocks: int, seed: int) -> tuple[KVCacheLayout, torch.Tensor]:
    _, kvh, d = heads
    layout = KVCacheLayout(2, blocks, BS, kvh, d, "bfloat16")
    return layout, rand(*layout.shape, seed=seed).view(-1, BS * d)


def scattered(n: int, blocks: int, seed: int) -> list[list[int]]:
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i * n : (i + 1) * n] for i in range(blocks // n)]


def step(layout: KVCacheLayout, chunks: list[tuple[int, int]], window: int | None, seed: int):
    """Metadata for one step of prefill chunks, each ``(cached prefix, chunk length)``, in scattered blocks."""
    indexer = PagedKVIndexer(layout)
    per_seq = max(-(-(p + n) // BS) for p, n in chunks)
    tables = scattered(per_seq, layout.num_blocks, seed)
    slots, prefills, start = [], [], 0
    for (prefix, n), table in zip(chunks, tables):
        slots += [table[p // BS] * BS + p % BS for p in range(prefix, prefix + n)]
        prefills.append(indexer.prefill_seq(start, table, prefix + n, n, window))
        start += n
    meta = AttentionMetadata(write_index=indexer.token_slots(torch.tensor(slots)),
                             reads={window: PagedReads(window=window, prefills=prefills)})
    return meta, start


def compare(backend, heads, chunks, window=None, softcap=None, seed=0):
    h, kvh, d = heads
    blocks = len(chunks) * max(-(-(p + n) // BS) for p, n in chunks) + 3
    layout, kv_rows = layout_and_cache(heads, blocks, seed)
    meta, T = step(layout, chunks, window, seed + 1)
    q, k, v = rand(T, h, d, seed=seed + 2), rand(T, kvh, d, seed=seed + 3), rand(T, kvh, d, seed=seed + 4)
    spec = LayerAttention(1, h, kvh, d, d ** -0.5, window=window, softcap=softcap)
    kv_ref = kv_rows.float()
    want = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), kv_ref, spec, meta)
    got = backend.forward(q, k, v, kv_rows, spec, meta)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, **TOL)
    assert torch.equal(kv_rows.float(), kv_ref)  # the step's keys and values stored at the same slots


@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 8, 128), (4, 1, 256)])
def test_chunks_without_a_prefix_in_one_call(backend, heads):
    """Ragged fresh prompts (1 token, under a tile, tile-aligned, over several tiles) attended together."""
    compare(backend, heads, [(0, 1), (0, 5), (0, 32), (0, 33), (0, 100), (0, 257)])


@pytest.mark.parametrize("prefix", [16, 48, 200])
def test_chunks_over_a_cached_prefix_read_blocks_in_place(backend, prefix):
    """Chunks longer than the paged operator's tile after a cached prefix, beside a fresh chunk."""
    compare(backend, (9, 3, 64), [(prefix, 70), (0, 40), (prefix + 16, 17)], seed=5)


@pytest.mark.parametrize("window", [7, 40])
def test_sliding_window(backend, window):
    compare(backend, (8, 2, 128), [(0, 90), (64, 50)], window=window, seed=7)


def test_softcapping(backend):
    compare(backend, (4, 1, 256), [(0, 45), (32, 33)], softcap=3.0, seed=9)


def test_a_long_prompt_split_between_threads(backend):
    """One 700-token prompt over several threads (dynamically scheduled tiles) equals the reference."""
    with torch_threads(2):
        compare(backend, (9, 3, 64), [(0, 700)], seed=11)


def test_other_dtypes_and_head_sizes_use_the_reference(backend):
    """fp32, or a head size not a multiple of 64: the backend keeps the exact reference path."""
    heads = (6, 2, 16)
    layout, kv_rows = layout_and_cache(heads, 32, 0)
    kv_rows = kv_rows.float()
    meta, T = step(layout, [(0, 20), (16, 30)], None, 1)
    q, k, v = (rand(T, n, 16, seed=s).float() for n, s in ((6, 2), (2, 3), (2, 4)))
    spec = LayerAttention(0, 6, 2, 16, 0.25)
    want = TorchReferenceBackend().forward(q, k, v, kv_rows.clone(), spec, meta)
    torch.testing.assert_close(backend.forward(q, k, v, kv_rows, spec, meta), want, rtol=1e-5, atol=1e-5)


def test_chunks_read_from_one_projection_row_and_written_in_place(backend):
    """q, k and v as the model splits them from one qkv row (strided views, no copies) give the same bits as
    contiguous copies, written into the chunks' rows of ``out`` and nowhere else."""
    from tandem.engine.attention import cpu_paged

    h, kvh, d = 9, 3, 64
    T = 150
    qkv = rand(T, (h + 2 * kvh) * d, seed=40)
    q, k, v = (t.view(T, -1, d) for t in qkv.split([h * d, kvh * d, kvh * d], dim=-1))
    assert not q.is_contiguous()
    starts, lens = torch.tensor([0, 70]), torch.tensor([70, 75])  # rows 145..149 belong to no chunk
    want = cpu_paged._extension.prefill_attention_dense(q.contiguous(), k.contiguous(), v.contiguous(), starts, lens,
                                                         d ** -0.5, 0, False, 0.0)
    out = torch.full((T, h, d), 7.0, dtype=torch.bfloat16)
    cpu_paged._extension.prefill_attention_dense_into(q, k, v, starts, lens, d ** -0.5, 0, False, 0.0, out)
    assert torch.equal(out[:145], want[:145])
    assert torch.equal(out[145:], torch.full((5, h, d), 7.0, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="k: expected \\[T, heads, D\\] with each token's heads contiguous"):
        cpu_paged._extension.prefill_attention_dense_into(q, k.transpose(0, 1).contiguous().transpose(0, 1), v,
                                                          starts, lens, d ** -0.5, 0, False, 0.0, out)


def test_bad_shapes_are_refused_not_read_out_of_bounds(backend):
    q, k = rand(10, 4, 64, seed=0), rand(10, 2, 64, seed=1)
    with pytest.raises(RuntimeError, match="a chunk lies outside q"):
        torch.ops.tandem.prefill_dense(q, k, k, torch.tensor([5]), torch.tensor([6]), 0.125, 0, None)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.tandem.prefill_dense(q[..., :32].contiguous(), k[..., :32].contiguous(), k[..., :32].contiguous(),
                                       torch.tensor([0]), torch.tensor([10]), 0.125, 0, None)
    kv_rows = rand(8, BS * 64, seed=2)
    with pytest.raises(RuntimeError, match="do not cover"):
        torch.ops.tandem.prefill_paged(q, kv_rows, torch.arange(4), 0, 40, 0.125, 0, None, 2)


def test_prefill_ops_are_opaque_to_torch_compile(backend):
    q, k = rand(40, 4, 64, seed=0), rand(40, 2, 64, seed=1)
    starts, lens = torch.tensor([0, 15]), torch.tensor([15, 25])
    explained = torch._dynamo.explain(
        lambda x: torch.ops.tandem.prefill_dense(x * 2, k, k, starts, lens, 0.125, 0, None))(q)
    assert explained.graph_break_count == 0


# ---- decodes ------------------------------------------------------------------------------------------------------

# Groups of query heads: 3 (SmolLM2), 1, 8 at head size 256, 12; and 7, 5 (head size 64) and 3 (head size 128),
# which the value products take in groups of 3 or 2 heads with a remainder of 1 or 2.
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 8, 128), (16, 2, 256), (12, 1, 64), (14, 2, 64), (10, 2, 64),
                                   (6, 2, 128)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_decodes(backend, heads, window, softcap):
    from tandem.engine.attention.cpu_paged import paged_attention

    h, kvh, d = heads
    ctx_lens = [1, 15, 16, 17, 100, 300]
    per_seq = -(-max(ctx_lens) // BS)
    layout, kv_rows = layout_and_cache(heads, per_seq * len(ctx_lens) + 2, seed=13)
    tables = scattered(per_seq, layout.num_blocks, seed=14)[: len(ctx_lens)]
    # The slots after each context in its last block were never written: NaN there must not reach the output.
    clean = kv_rows.clone()
    cache = kv_rows.view(layout.shape)
    for table, ctx in zip(tables, ctx_lens):
        if ctx % BS:
            cache[table[(ctx - 1) // BS], :, :, :, ctx % BS :] = float("nan")
    rows, mask = PagedKVIndexer(layout).paged_batch(list(zip(tables, ctx_lens)), 1, window)
    spec = LayerAttention(1, h, kvh, d, d ** -0.5, window=window, softcap=softcap)
    q = rand(len(ctx_lens), 1, h, d, seed=15)
    want = reference_paged_attention(q.float(), clean.float(), rows[1], mask, spec)
    got = paged_attention(q, kv_rows, rows[1], mask, spec)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, **TOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_long_decode_split_between_threads(backend, threads):
    from tandem.engine.attention.cpu_paged import paged_attention

    heads = (9, 3, 64)
    layout, kv_rows = layout_and_cache(heads, 80, seed=16)
    table = scattered(70, 80, seed=17)[0]
    rows, mask = PagedKVIndexer(layout).paged_batch([(table, 1111)], 1, None)
    spec = LayerAttention(0, 9, 3, 64, 0.125)
    q = rand(1, 1, 9, 64, seed=18)
    with torch_threads(threads):
        got = paged_attention(q, kv_rows, rows[0], mask, spec)
    torch.testing.assert_close(got.float(), reference_paged_attention(q.float(), kv_rows.float(), rows[0], mask, spec),
                               **TOL)


def test_a_batch_of_decodes_is_the_same_on_any_number_of_threads(backend):
    """The decode items go to the threads in ranges with stealing (``csrc/parallel.h``): whichever thread computes an
    item, each is computed once and alike, so the output is bit-identical for 1, 2, 3 and 5 threads."""
    from tandem.engine.attention.cpu_paged import paged_attention

    heads = (9, 3, 64)
    ctx_lens = [int(n) for n in torch.randint(1, 200, (23,), generator=torch.Generator().manual_seed(19))]
    per_seq = -(-max(ctx_lens) // BS)
    layout, kv_rows = layout_and_cache(heads, per_seq * len(ctx_lens), seed=20)
    tables = scattered(per_seq, layout.num_blocks, seed=21)
    rows, mask = PagedKVIndexer(layout).paged_batch(list(zip(tables, ctx_lens)), 1, None)
    spec = LayerAttention(1, 9, 3, 64, 0.125)
    q = rand(len(ctx_lens), 1, 9, 64, seed=22)
    outs = []
    for threads in (1, 2, 3, 5):
        with torch_threads(threads):
            outs.append(paged_attention(q, kv_rows, rows[1], mask, spec))
    torch.testing.assert_close(outs[0].float(), reference_paged_attention(q.float(), kv_rows.float(), rows[1], mask,
                                                                          spec), **TOL)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
