"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) written against the paged KV cache.

Tokens of a step are packed into one flat sequence ``[T]``: first one token per decoding request,
then each prefill chunk. The linear layers run once over all ``T`` tokens; attention reads and writes
the paged KV cache through the ``AttentionMetadata`` passed in (never a module global).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict; unsupported architectures raise ValueError."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(model_type or "")
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}: Tandem serves "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )


# Tiny configurations for tests (randomly initialised): gpt-fast style named presets.
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny-qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=512, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, rope_theta=1000000.0, tie_word_embeddings=True),
}


@dataclass(slots=True)
class PrefillSeq:
    """One prefill chunk in the packed batch."""

    q_start: int  # offset of its first token in the flat batch
    q_len: int
    ctx_len: int  # tokens in the cache after this chunk (prefix + chunk)
    # [num_layers, 2 * kv_heads * blocks]: cache rows of the blocks covering the context, in (K/V, head, block)
    # order, per layer; None when the chunk has no cached prefix (it attends to its own keys only).
    gather_rows: torch.Tensor | None = None


@dataclass(slots=True)
class VerifyGroup:
    """Speculative verification chunks of one length ``q_len`` (the last token and its drafts), attended like the
    decodes: one gather of their blocks and one batched attention per layer, not one call per chunk."""

    token_index: torch.Tensor  # [B * q_len]: flat token of each (chunk, position)
    gather_rows: torch.Tensor  # [num_layers, 2 * kv_heads * B * max_blocks], (K/V, head, seq, block)
    mask: torch.Tensor  # [1, B, 1, q_len, max_blocks * block_size]: True where attended (causal within the chunk)
    num_seqs: int
    q_len: int


@dataclass(slots=True)
class AttentionMetadata:
    """How this step's flat tokens map onto the paged KV cache (indices per layer, built once per step).

    Indices address the block-major buffer of ``core/kv_layout.py`` viewed as ``[rows, block_size * head_dim]``
    (rows) or ``[rows * block_size, head_dim]`` (token vectors).
    """

    write_index: torch.Tensor  # [num_layers, 2 * kv_heads * T]: where each new K/V vector goes, (K/V, head, token) order
    num_decode: int = 0  # the first num_decode tokens are single-token decodes
    decode_gather_rows: torch.Tensor | None = None  # [num_layers, 2 * kv_heads * Bd * max_blocks], (K/V, head, seq, block)
    decode_mask: torch.Tensor | None = None  # [1, Bd, 1, 1, max_blocks * block_size] True where attended
    verify: list[VerifyGroup] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)
    # GPU only: the prefill chunks without a cached prefix, attended as one padded batch (see FreshPrefillBatch).
    fresh_batch: FreshPrefillBatch | None = None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every index tensor with ``fn(tensor)`` (e.g. a copy on the model's device), in place."""
        self.write_index = fn(self.write_index)
        if self.decode_gather_rows is not None:
            self.decode_gather_rows = fn(self.decode_gather_rows)
        if self.decode_mask is not None:
            self.decode_mask = fn(self.decode_mask)
        for grp in self.verify:
            grp.token_index, grp.gather_rows, grp.mask = fn(grp.token_index), fn(grp.gather_rows), fn(grp.mask)
        for seq in self.prefills:
            if seq.gather_rows is not None:
                seq.gather_rows = fn(seq.gather_rows)
        fresh = self.fresh_batch
        if fresh is not None:
            fresh.token_index, fresh.valid, fresh.mask = fn(fresh.token_index), fn(fresh.valid), fn(fresh.mask)


@dataclass(slots=True)
class FreshPrefillBatch:
    """Prefill chunks that attend only to themselves, padded to ``[n, S]`` (S: the longest) for one attention call.

    NOTE: on a GPU one call per chunk and layer is launch-bound (256 short prompts ran at half transformers' batched
    speed on an H100); on the CPU the per-chunk loop is kept, where padding would cost real compute.
    """

    token_index: torch.Tensor  # [n, S] flat token of each (chunk, position); padding repeats the chunk's first token
    valid: torch.Tensor  # [n, S] True for real tokens
    mask: torch.Tensor  # [n, 1, S, S] causal and within the chunk; a padded query row still sees its chunk's start


def fresh_prefill_batch(prefills: list[PrefillSeq]) -> FreshPrefillBatch | None:
    """The prefill chunks with no cached prefix as one padded batch, on the host (None for fewer than two)."""
    fresh = [seq for seq in prefills if seq.gather_rows is None]
    if len(fresh) < 2:
        return None
    lengths = torch.tensor([seq.q_len for seq in fresh])
    pos = torch.arange(int(lengths.max()))
    valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [n, S]
    starts = torch.tensor([seq.q_start for seq in fresh]).unsqueeze(1)
    token_index = torch.where(valid, starts + pos.unsqueeze(0), starts)
    mask = (pos.unsqueeze(0) <= pos.unsqueeze(1)).unsqueeze(0) & valid.unsqueeze(1)  # [n, S(query), S(key)]
    return FreshPrefillBatch(token_index, valid, mask.unsqueeze(1))


def attend_fresh_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: FreshPrefillBatch,
                       out: torch.Tensor) -> None:
    """Causal attention of every chunk in ``batch`` to itself, in one call; q/out ``[T, H, D]``, k/v ``[T, kvh, D]``."""
    qb, kb, vb = (t[batch.token_index].transpose(1, 2) for t in (q, k, v))  # [n, heads, S, D]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=batch.mask, enable_gqa=True)
    out[batch.token_index[batch.valid]] = o.transpose(1, 2)[batch.valid]


class PackedLinear(nn.Module):
    """A bf16 CPU linear whose weight is pre-packed once for oneDNN (what inductor's freezing does).

    NOTE: aten's bf16 linear re-lays the weight out on every call; for the small matrices of a 135M
    model at decode batch sizes that costs more than the multiply itself.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack_linears(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(nn.Linear(8, 4, bias=False).to(dtype).requires_grad_(False))
        out = probe(torch.ones(2, 8, dtype=dtype))
        return out.shape == (2, 4) and bool(torch.isfinite(out).all())
    except (RuntimeError, AttributeError):
        return False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D/2] in x's dtype (rotate-half convention, as HF computes it)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_rows: torch.Tensor,  # the whole KV buffer as [rows, block_size * D] (block-major, see kv_layout.py)
        layer: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        kvh, D = self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(T, self.num_heads, D), cos, sin)
        k = apply_rope(k.view(T, kvh, D), cos, sin)
        v = v.view(T, kvh, D)
        new_kv = torch.stack((k, v)).transpose(1, 2).reshape(-1, D)  # [(K/V, head, token), D]
        kv_rows.view(-1, D).index_copy_(0, meta.write_index[layer], new_kv)

        out = torch.empty(T, self.num_heads, D, dtype=x.dtype, device=x.device)
        if meta.num_decode:
            bd = meta.num_decode
            out[:bd] = self._paged_attention(q[:bd].view(bd, 1, self.num_heads, D), kv_rows,
                                             meta.decode_gather_rows[layer], meta.decode_mask).view(bd, -1, D)
        for grp in meta.verify:
            qv = q.index_select(0, grp.token_index).view(grp.num_seqs, grp.q_len, self.num_heads, D)
            o = self._paged_attention(qv, kv_rows, grp.gather_rows[layer], grp.mask)
            out.index_copy_(0, grp.token_index, o.view(-1, self.num_heads, D))
        fresh = meta.fresh_batch
        if fresh is not None:
            attend_fresh_batch(q, k, v, fresh, out)
        for seq in meta.prefills:
            if fresh is not None and seq.gather_rows is None:
                continue  # attended in the padded batch above
            qs = q[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            if seq.gather_rows is None:  # no cached prefix: attend to this chunk, causally
                ks = k[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1).unsqueeze(0)
                vs = v[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                kvs = kv_rows.index_select(0, seq.gather_rows[layer]).view(2, kvh, -1, D)[:, :, : seq.ctx_len]
                ks, vs = kvs[0].unsqueeze(0), kvs[1].unsqueeze(0)
                # Query i sits at position ctx_len - q_len + i and sees keys up to it.
                qpos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=x.device).unsqueeze(1)
                mask = torch.arange(seq.ctx_len, device=x.device).unsqueeze(0) <= qpos
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[seq.q_start : seq.q_start + seq.q_len] = o[0].transpose(0, 1)
        return self.o_proj(out.view(T, self.q_size))

    def _paged_attention(self, q: torch.Tensor, kv_rows: torch.Tensor, rows: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Q, H, D]`` (Q queries per sequence) attending to its sequence's blocks, gathered whole by
        ``rows``; ``mask`` ``[1, B, 1, Q, L]``. One gather of ``[block_size, D]`` rows yields K and V as
        ``[2, kv_heads, B, L, D]`` (L = max_blocks * block_size), the order batched attention reads."""
        B, Q, H, D = q.shape
        kvh = self.num_kv_heads
        group = H // kvh
        kv = kv_rows.index_select(0, rows).view(2, kvh, B, -1, D)
        qg = q.view(B, Q, kvh, group, D).permute(2, 0, 3, 1, 4).reshape(kvh, B, group * Q, D)
        scores = torch.matmul(qg, kv[0].transpose(-1, -2)) * self.scale  # [kvh, B, group * Q, L]
        scores = scores.view(kvh, B, group, Q, -1).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype).view(kvh, B, group * Q, -1)
        out = torch.matmul(probs, kv[1])  # [kvh, B, group * Q, D]
        return out.view(kvh, B, group, Q, D).permute(1, 3, 0, 2, 4).reshape(B, Q, H, D)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.packed_lm_head: PackedLinear | None = None

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_buffer: torch.Tensor,  # the whole block-major KV cache (see kv_layout.py)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (normalised); logits are computed separately."""
        h = self.embed_tokens(input_ids)
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        cos, sin = freqs.cos().to(h.dtype).unsqueeze(1), freqs.sin().to(h.dtype).unsqueeze(1)
        residual = h
        kv_rows = kv_buffer.view(-1, kv_buffer.shape[-2] * kv_buffer.shape[-1])
        for i, layer in enumerate(self.layers):
            a = layer.self_attn(layer.input_layernorm(h), cos, sin, kv_rows, i, meta)
            residual = residual + a
            m = layer.mlp(layer.post_attention_layernorm(residual))
            residual = residual + m
            h = residual
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    @torch.no_grad()
    def pack_linears(self) -> None:
        """Swap every projection (and the LM head) for a pre-packed oneDNN linear (bf16 CPU only)."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj = PackedLinear(attn.qkv_proj)
            attn.o_proj = PackedLinear(attn.o_proj)
            mlp.gate_up_proj = PackedLinear(mlp.gate_up_proj)
            mlp.down_proj = PackedLinear(mlp.down_proj)
        head = self.lm_head if self.lm_head is not None else _as_linear(self.embed_tokens.weight)
        self.packed_lm_head = PackedLinear(head)

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Missing or misshapen tensors raise."""
        cfg = self.config

        def take(name: str) -> torch.Tensor:
            try:
                return state[name]
            except KeyError:
                raise ValueError(f"weights are missing tensor {name!r}") from None

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value)

        put(self.embed_tokens.weight, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm.weight, take("model.norm.weight"), "model.norm.weight")
        if self.lm_head is not None:
            put(self.lm_head.weight, state.get("lm_head.weight", state["model.embed_tokens.weight"]), "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            qkv = torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"], dim=0)
            put(layer.self_attn.qkv_proj.weight, qkv, attn + "qkv")
            if cfg.qkv_bias:
                bias = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"], dim=0)
                put(layer.self_attn.qkv_proj.bias, bias, attn + "qkv bias")
            put(layer.self_attn.o_proj.weight, take(attn + "o_proj.weight"), attn + "o_proj.weight")
            gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], dim=0)
            put(layer.mlp.gate_up_proj.weight, gate_up, p + "mlp.gate_up")
            put(layer.mlp.down_proj.weight, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj.weight")
            put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"),
                p + "post_attention_layernorm.weight")
