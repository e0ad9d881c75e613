"""The torch reference attention backend: gathers the blocks a batch needs and attends with plain torch ops.

Kept as the fallback for any device and as the oracle faster backends are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.attention.backend import LayerAttention
from tandem.engine.attention.metadata import AttentionMetadata, FreshPrefillBatch, PrefillSeq
from tandem.engine.attention.paged import window_mask, write_kv


class TorchReferenceBackend:
    """Paged attention in torch: batched gathers for decodes and verify chunks, one call per prefill chunk (CPU) or
    one padded call for the chunks without a cached prefix (GPU)."""

    name = "torch"

    def paged(self, q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
              spec: LayerAttention) -> torch.Tensor:
        """Decode rows and verify chunks over their blocks (see :func:`paged_attention`); backends override it."""
        return paged_attention(q, kv_rows, rows, mask, spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor,
                spec: LayerAttention, meta: AttentionMetadata) -> torch.Tensor:
        layer = spec.layer
        self.write_kv(kv_rows, meta.write_index[layer], k, v)
        reads = meta.for_window(spec.window)
        T, H, D = q.shape
        if meta.num_decode == T:  # decodes only: their output is the step's
            return self.paged(q.view(T, 1, H, D), kv_rows, reads.decode_gather_rows[layer], reads.decode_mask,
                              spec).reshape(T, H, D)
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        if meta.num_decode:
            bd = meta.num_decode
            o = self.paged(q[:bd].view(bd, 1, H, D), kv_rows, reads.decode_gather_rows[layer], reads.decode_mask,
                           spec)
            out[:bd] = o.view(bd, H, D)
        for grp in reads.verify:
            qv = q.index_select(0, grp.token_index).view(grp.num_seqs, grp.q_len, H, D)
            o = self.paged(qv, kv_rows, grp.gather_rows[layer], grp.mask, spec)
            out.index_copy_(0, grp.token_index, o.view(-1, H, D))
        fresh = reads.fresh_batch
        if fresh is not None:
            attend_fresh_batch(q, k, v, fresh, out, spec)
            prefills = [seq for seq in reads.prefills if seq.gather_rows is not None]  # the rest: attended above
        else:
            prefills = reads.prefills
        if prefills:
            self.attend_prefills(q, k, v, kv_rows, prefills, spec, out)
        return out

    def write_kv(self, kv_rows: torch.Tensor, write_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the layer's new keys and values at their slots (backends may override)."""
        write_kv(kv_rows, write_index, k, v)

    def attend_prefills(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor,
                        prefills: list[PrefillSeq], spec: LayerAttention, out: torch.Tensor) -> None:
        """Every prefill chunk of the step into its rows of ``out``; here one call per chunk (backends override)."""
        for seq in prefills:
            out[seq.q_start : seq.q_start + seq.q_len] = self._prefill(q, k, v, kv_rows, seq, spec)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_rows: torch.Tensor, seq: PrefillSeq,
                 spec: LayerAttention) -> torch.Tensor:
        """One chunk's attention, ``[q_len, H, D]``: to itself, or to its gathered prefix and itself."""
        chunk = slice(seq.q_start, seq.q_start + seq.q_len)
        qs = q[chunk].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        qpos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=q.device).unsqueeze(1)
        if seq.gather_rows is None:  # no cached prefix: attend to this chunk, causally
            ks, vs = (t[chunk].transpose(0, 1).unsqueeze(0) for t in (k, v))
            if spec.window is None or spec.window >= seq.q_len:
                o = dense_attention(qs, ks, vs, None, spec, causal=True)
            else:
                o = dense_attention(qs, ks, vs, window_mask(qpos.view(1, -1), qpos, spec.window), spec)
        else:
            kvh, D = spec.num_kv_heads, spec.head_dim
            num_keys = seq.ctx_len - seq.kv_start
            kvs = kv_rows.index_select(0, seq.gather_rows[spec.layer]).view(2, kvh, -1, D)[:, :, :num_keys]
            ks, vs = kvs[0].unsqueeze(0), kvs[1].unsqueeze(0)
            # Query i sits at position ctx_len - q_len + i and sees keys up to it (and within the window).
            kpos = torch.arange(seq.kv_start, seq.ctx_len, device=q.device).unsqueeze(0)
            o = dense_attention(qs, ks, vs, window_mask(kpos, qpos, spec.window), spec)
        return o[0].transpose(0, 1)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    spec: LayerAttention, causal: bool = False) -> torch.Tensor:
    """``[N, H, Q, D]`` queries over ``[N, kv_heads, K, D]`` keys/values; ``mask`` True where attended."""
    if spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=spec.scale,
                                              enable_gqa=True)
    # NOTE: SDPA has no logit softcapping: scores are computed here, as transformers' eager attention does.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * spec.scale, spec.softcap)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(scores / cap)``: bounds attention logits (identity when ``cap`` is None)."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


def attend_fresh_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: FreshPrefillBatch,
                       out: torch.Tensor, spec: LayerAttention | None = None) -> None:
    """Causal attention of every chunk in ``batch`` to itself, in one call; q/out ``[T, H, D]``, k/v ``[T, kvh, D]``.
    Without ``spec``: the default scale (head_dim ** -0.5), no softcap."""
    if spec is None:
        spec = LayerAttention(0, q.shape[1], k.shape[1], q.shape[2], q.shape[2] ** -0.5)
    qb, kb, vb = (t[batch.token_index].transpose(1, 2) for t in (q, k, v))  # [n, heads, S, D]
    o = dense_attention(qb, kb, vb, batch.mask, spec)
    out[batch.token_index[batch.valid]] = o.transpose(1, 2)[batch.valid]


def paged_attention(q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor,
                    spec: LayerAttention) -> torch.Tensor:
    """``q`` ``[B, Q, H, D]`` (Q queries per sequence) attending to its sequence's blocks, gathered whole by
    ``rows``; ``mask`` ``[1, B, 1, Q, L]``. One gather of ``[block_size, D]`` rows yields K and V as
    ``[2, kv_heads, B, L, D]`` (L = max_blocks * block_size), the order batched attention reads."""
    B, Q, H, D = q.shape
    kvh = spec.num_kv_heads
    group = H // kvh
    kv = kv_rows.index_select(0, rows).view(2, kvh, B, -1, D)
    qg = q.view(B, Q, kvh, group, D).permute(2, 0, 3, 1, 4).reshape(kvh, B, group * Q, D)
    scores = softcap(torch.matmul(qg, kv[0].transpose(-1, -2)) * spec.scale, spec.softcap)  # [kvh, B, group*Q, L]
    scores = scores.view(kvh, B, group, Q, -1).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype).view(kvh, B, group * Q, -1)
    out = torch.matmul(probs, kv[1])  # [kvh, B, group * Q, D]
    return out.view(kvh, B, group, Q, D).permute(1, 3, 0, 2, 4).reshape(B, Q, H, D)
