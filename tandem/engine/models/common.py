"""Building blocks every model family uses: norms, RoPE, packed linears, the paged self-attention layer, the gated
MLP and the decoder-only language model around them (embedding, layers, final norm, LM head, weight loading).

Tokens of a step are packed into one flat sequence ``[T]``: first one token per decoding request, then
speculative verify chunks and prefill chunks. The linear layers run once over all ``T`` tokens; attention goes
through the backend the runner chose (``tandem.engine.attention``) with the step's ``AttentionMetadata``.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata, LayerAttention, TorchReferenceBackend
from tandem.engine.models.config import ModelConfig
from tandem.engine.ops.fused import FusedOps

GLOBAL_ROPE = "global"
LOCAL_ROPE = "local"


class PackedLinear(nn.Module):
    """A bf16 CPU linear whose weight is re-laid out once: into the blocks of Tandem's own kernel when the fused CPU
    ops are loaded (``ops``; see ``ops/csrc/linear_cpu.cpp``), else pre-packed for oneDNN (what inductor's freezing
    does).

    NOTE: aten's bf16 linear re-lays the weight out on every call; for the small matrices of a 135M model at decode
    batch sizes that costs more than the multiply itself. oneDNN's packed product in turn streams the weights at
    16-28 GB/s at decode's few rows; Tandem's kernel reads them at 35-45 GB/s (all of SmolLM2's linears for one
    token, weights cold in cache: 5.1-6.8 ms vs 9.4-15.3 ms across alternating runs here).
    """

    def __init__(self, linear: nn.Linear, ops: FusedOps | None = None) -> None:
        super().__init__()
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.ops = ops if ops is not None and ops.packs(weight) else None
        if self.ops is not None:
            self.packed = self.ops.pack_linear_weight(weight)
            self.bias = None
            if linear.bias is not None:
                self.bias = torch.zeros(self.packed.shape[0] * self.packed.shape[2], dtype=torch.float32)
                self.bias[: self.out_features] = linear.bias.detach().float()
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and x.dtype == torch.bfloat16:
            if x.dim() == 2 and x.is_contiguous():  # the layers' case: no reshaping on the per-token path
                return self.ops.packed_linear(x, self.packed, self.out_features, self.bias)
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            out = self.ops.packed_linear(rows, self.packed, self.out_features, self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class PackedGatedLinear(nn.Module):
    """A gated MLP's fused gate/up projection and its activation in one product: ``silu(x G^T) * (x U^T)``, the
    weight packed by Tandem's kernel with 32 gate and 32 up columns per block (``pack_gated_weight``), so the
    activation is applied as the product's columns are stored: the ``[T, 2I]`` projection is never written out.
    Bit-identical to the plain packed linear followed by ``silu_mul``."""

    def __init__(self, linear: nn.Linear, ops: FusedOps) -> None:
        super().__init__()
        self.ops = ops
        self.intermediate = linear.out_features // 2
        self.packed = ops.pack_gated_weight(linear.weight.detach())

    @staticmethod
    def applies(linear: nn.Linear, ops: FusedOps | None) -> bool:
        return (ops is not None and linear.bias is None and ops.packs(linear.weight)
                and linear.out_features % 64 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
        out = self.ops.packed_linear_silu_mul(rows, self.packed, self.intermediate)
        return out if rows is x else out.view(*x.shape[:-1], self.intermediate)


def can_pack_linears(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's pre-packed bf16 linear works here (bf16 on a CPU with mkldnn)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(nn.Linear(8, 4, bias=False).to(dtype).requires_grad_(False))
        out = probe(torch.ones(2, 8, dtype=dtype))
        return out.shape == (2, 4) and bool(torch.isfinite(out).all())
    except (RuntimeError, AttributeError):
        return False


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, cast back, then scale by ``weight``. With fused CPU ops (``fused``), one
    kernel for contiguous rows (and for the residual add before it, ``add_norm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused: FusedOps | None = None

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` and its norm; the fused kernel adds into ``residual`` in place."""
        if self._fusable(x) and residual.is_contiguous():
            return self.fused.rms_norm(x, self.weight, self.eps, residual), residual
        residual = residual + x
        return self(residual), residual

    def _fusable(self, x: torch.Tensor) -> bool:
        return self.fused is not None and self.fused.applies(x) and x.is_contiguous() and x.shape[-1] % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            return self.fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is an offset from one, ``x * (1 + w)``, applied in fp32 before the cast."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def rope_inv_freq(theta: float, head_dim: int, scaling: dict | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` (fp32) for base ``theta`` with optional linear/llama3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    scaling = scaling or {}
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


@dataclass(frozen=True, slots=True)
class Rope:
    """One step's RoPE tables for every token: fp32 ``[T, D/2]`` (the fused kernel's) and ``[T, 1, D/2]`` in the
    activations' dtype (the torch ops', rounded as transformers rounds them)."""

    cos32: torch.Tensor
    sin32: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, D/2]
        cos32, sin32 = freqs.cos(), freqs.sin()
        return cls(cos32, sin32, cos32.to(dtype).unsqueeze(1), sin32.to(dtype).unsqueeze(1))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D/2] in x's dtype (rotate-half convention, as HF computes it)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def as_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` sharing ``weight`` (e.g. the tied embedding as the LM head)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class SelfAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm, RoPE, paged attention through the backend, output
    projection. ``norm`` builds the q/k norms (``cfg.qk_norm``) in the family's flavour."""

    def __init__(self, cfg: ModelConfig, layer: int, norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        scale = cfg.head_dim**-0.5 if cfg.attn_scale is None else cfg.attn_scale
        self.spec = LayerAttention(layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale, cfg.window(layer),
                                   cfg.attn_logit_softcapping)
        self.rope_key = LOCAL_ROPE if self.spec.window is not None and cfg.local_rope_theta is not None else GLOBAL_ROPE
        self.fused: FusedOps | None = None

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: Rope,
        kv_rows: torch.Tensor,  # the whole KV buffer as [rows, block_size * D] (block-major, see kv_layout.py)
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        T = x.shape[0]
        D = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, self.num_heads, D), k.view(T, self.num_kv_heads, D), v.view(T, self.num_kv_heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused is not None and self.fused.applies(q) and D % 32 == 0:
            self.fused.rope_(q, k, rope.cos32, rope.sin32)  # in place, on the projection's output
        else:
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        out = backend.forward(q, k, v, kv_rows, self.spec, meta)
        return self.o_proj(out.view(T, self.q_size))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_tanh"
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate_up_proj, PackedGatedLinear):  # the activation inside the product (pack_linears)
            return self.down_proj(self.gate_up_proj(x))
        gate_up = self.gate_up_proj(x)
        if (self.fused is not None and not self.gelu and self.fused.applies(x) and gate_up.dim() == 2
                and self.intermediate % 16 == 0):
            return self.down_proj(self.fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


class NativeDecoder:
    """Every decoder layer of a decode-only step in one native call (``ops/csrc/decoder_cpu.cpp``): the same kernels
    the layers call, in the same order, without Python between them (bit-identical hidden states). A family builds
    it when all its layers are ones the native stack knows (see ``LlamaForCausalLM.build_native_decoder``)."""

    def __init__(self, stack: object) -> None:
        self.stack = stack

    def __call__(self, h: torch.Tensor, rope: Rope, kv_rows: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        reads = meta.for_window(None)
        mask = reads.decode_mask.reshape(h.shape[0], 1, -1).contiguous()
        return self.stack.forward(h, rope.cos32, rope.sin32, kv_rows, meta.write_index, reads.decode_gather_rows, mask)


# Our fused parameters and the checkpoint tensors they are made of.
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


class DecoderLM(nn.Module, abc.ABC):
    """A decoder-only language model over the paged KV cache; families subclass it and build their layers.

    A family's layer takes ``(h, rope, kv_rows, meta, backend)`` and returns the new hidden states ``[T, hidden]``.
    Parameter names mirror the Hugging Face checkpoint's (under one of ``cfg.weight_prefixes``), except the fused
    ``qkv_proj`` and ``gate_up_proj``, which loading builds from their parts.
    """

    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_lm_head: PackedLinear | None = None
        self.embed_scale: float | None = None  # multiplies the embeddings (Gemma: sqrt(hidden_size))
        self.attention_backend: AttentionBackend = TorchReferenceBackend()
        self.native_decoder: NativeDecoder | None = None  # decode-only steps, when the family builds one
        self.rope_inv_freq: dict[str, torch.Tensor] = {}
        self.init_rope(torch.device("cpu"))

    @abc.abstractmethod
    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        """Decoder layer ``index`` of this family (each family file defines it)."""

    def init_rope(self, device: torch.device) -> None:
        """(Re)build the RoPE frequency tables in fp32 on ``device`` (after a move or a dtype cast)."""
        cfg = self.config
        tables = {GLOBAL_ROPE: rope_inv_freq(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling, device)}
        if cfg.local_rope_theta is not None:
            tables[LOCAL_ROPE] = rope_inv_freq(cfg.local_rope_theta, cfg.head_dim, cfg.local_rope_scaling, device)
        self.rope_inv_freq = tables

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_buffer: torch.Tensor,  # the whole block-major KV cache (see kv_layout.py)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (normalised); logits are computed separately."""
        h = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        ropes = {key: Rope.at(positions, inv_freq, h.dtype) for key, inv_freq in self.rope_inv_freq.items()}
        kv_rows = kv_buffer.view(-1, kv_buffer.shape[-2] * kv_buffer.shape[-1])
        if self.native_decoder is not None and meta.num_decode == h.shape[0] and not torch.compiler.is_compiling():
            return self.norm(self.native_decoder(h, ropes[GLOBAL_ROPE], kv_rows, meta))
        for layer in self.layers:
            h = layer(h, ropes[layer.self_attn.rope_key], kv_rows, meta, self.attention_backend)
        return self.norm(h)

    def build_native_decoder(self, ops: FusedOps) -> str | None:
        """Set ``native_decoder`` when this model's layers can run as one native call; returns why not, or None.
        Families whose layers the native stack does not know keep the Python layers (this default)."""
        return f"{type(self).__name__} layers have no native decoder"

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed_lm_head is not None:
            logits = self.packed_lm_head(hidden)
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def use_fused_ops(self, ops: FusedOps | None) -> None:
        """Route the norms, RoPE and gated activations through the fused CPU kernels (None: their torch ops)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, SelfAttention, GatedMLP)):
                module.fused = ops

    @torch.no_grad()
    def pack_linears(self, ops: FusedOps | None = None) -> None:
        """Swap every projection (and the LM head) for a pre-packed linear (bf16 CPU only): Tandem's kernel with
        ``ops``, else oneDNN's."""
        for module in list(self.layers.modules()):
            for name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if (isinstance(module, GatedMLP) and name == "gate_up_proj" and not module.gelu
                        and PackedGatedLinear.applies(child, ops)):
                    setattr(module, name, PackedGatedLinear(child, ops))
                else:
                    setattr(module, name, PackedLinear(child, ops))
        head = self.lm_head if self.lm_head is not None else as_linear(self.embed_tokens.weight)
        self.packed_lm_head = PackedLinear(head, ops)

    def checkpoint_prefix(self, names: Collection[str]) -> str:
        """The first of ``cfg.weight_prefixes`` under which the checkpoint holds the embedding."""
        for prefix in self.config.weight_prefixes:
            if prefix + "embed_tokens.weight" in names:
                return prefix
        return self.config.weight_prefixes[0]

    def wants_tensor(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to this model (a multimodal file's vision tower does not)."""
        return name.startswith(self.config.weight_prefixes) or name in self.config.lm_head_names

    def checkpoint_names(self, name: str, prefix: str) -> list[str]:
        """The checkpoint tensors our parameter ``name`` is made of (concatenated along dim 0 when several)."""
        match = _LAYER_PARAM.fullmatch(name)
        if match:
            index, module, kind = match.groups()
            parts = _FUSED.get(module, (module,))
            return [f"{prefix}layers.{index}.{part}.{kind}" for part in parts]
        return [prefix + name]

    @torch.no_grad()
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint tensors in, fusing q/k/v and gate/up. Missing or misshapen tensors raise ValueError."""
        prefix = self.checkpoint_prefix(state.keys())
        for name, param in self.named_parameters():
            if name == "lm_head.weight":
                # An untied head missing from the file is the embedding, as transformers ties it.
                heads = [n for n in self.config.lm_head_names if n in state]
                sources = heads[:1] or [prefix + "embed_tokens.weight"]
            else:
                sources = self.checkpoint_names(name, prefix)
            missing = [s for s in sources if s not in state]
            if missing:
                raise ValueError(f"weights are missing tensor {missing[0]!r}")
            value = state[sources[0]] if len(sources) == 1 else torch.cat([state[s] for s in sources], dim=0)
            if param.shape != value.shape:
                raise ValueError(f"tensor {sources[0]!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value)
