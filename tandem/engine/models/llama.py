"""The Llama family (Llama 2/3, SmolLM2) and Qwen2, which is Llama with a q/k/v bias.

Pre-norm decoder layers: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``, SiLU-gated MLP, RoPE on every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.common import (
    DecoderLM,
    GatedMLP,
    NativeDecoder,
    PackedGatedLinear,
    PackedLinear,
    RMSNorm,
    Rope,
    SelfAttention,
)
from tandem.engine.models.config import ModelConfig, base_fields, hf_layer_windows
from tandem.engine.ops.fused import FusedOps


class LlamaDecoderLayer(nn.Module):
    """One pre-norm Llama layer."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, index, RMSNorm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, h: torch.Tensor, rope: Rope, kv_rows: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), rope, kv_rows, meta, backend)
        x, h = self.post_attention_layernorm.add_norm(a, h)  # h + a, and its norm
        return h + self.mlp(x)


class LlamaForCausalLM(DecoderLM):
    """Llama, SmolLM2, Qwen2 (and, through subclasses, Mistral and Qwen3)."""

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return LlamaDecoderLayer(cfg, index)

    def build_native_decoder(self, ops: FusedOps) -> str | None:
        """The native stack runs this family's layers (Qwen3's q/k norms included) without a sliding window or softcap:
        SiLU, the fused kernels' shapes, every projection in Tandem's packed linear, the CPU paged-attention
        backend."""
        cfg = self.config
        kernels = getattr(self.attention_backend, "decode_kernels", lambda: None)()
        layers = list(self.layers)
        reason = (
            "the attention backend has no native decode kernels" if kernels is None
            else "sliding-window layers" if any(cfg.window(i) is not None for i in range(cfg.num_layers))
            else "attention logit softcapping" if cfg.attn_logit_softcapping is not None
            else f"{cfg.hidden_act} activation" if cfg.hidden_act != "silu"
            else "shapes the fused kernels do not take" if (cfg.head_dim % 32 or cfg.hidden_size % 16
                                                               or cfg.intermediate_size % 16)
            else "other layer types" if any(type(layer) is not LlamaDecoderLayer for layer in layers)
            else "linears outside Tandem's packed kernel" if not all(
                isinstance(m, PackedLinear) and m.ops is not None
                for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                              layer.mlp.down_proj))
            else "gate/up projections outside the gated kernel" if not all(
                isinstance(layer.mlp.gate_up_proj, PackedGatedLinear) for layer in layers)
            else None
        )
        if reason is not None:
            return reason
        weights = [[layer.input_layernorm.weight.detach(), layer.self_attn.qkv_proj.packed,
                    layer.self_attn.qkv_proj.bias, layer.self_attn.o_proj.packed,
                    layer.post_attention_layernorm.weight.detach(), layer.mlp.gate_up_proj.packed,
                    layer.mlp.down_proj.packed,
                    *(None if norm is None else norm.weight.detach()
                      for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm))] for layer in layers]
        stack = ops.module.DecoderStack(weights, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                                        cfg.intermediate_size, cfg.rms_norm_eps, layers[0].self_attn.spec.scale,
                                        kernels)
        self.native_decoder = NativeDecoder(stack)
        return None


def qwen_layer_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    """Qwen2/Qwen3's sliding window: only with ``use_sliding_window``, on layers from ``max_window_layers`` on
    (transformers' rule), unless the config lists ``layer_types``."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return ()
    if hf.get("layer_types"):
        return hf_layer_windows(hf, num_layers)
    first = hf.get("max_window_layers", num_layers)
    windows = tuple(hf["sliding_window"] if i >= first else None for i in range(num_layers))
    return windows if any(w is not None for w in windows) else ()


def llama_config(hf: dict, architecture: str) -> ModelConfig:
    """A Llama config.json (Llama 2/3, SmolLM2)."""
    return ModelConfig(**base_fields(hf, architecture))


def qwen2_config(hf: dict, architecture: str) -> ModelConfig:
    """A Qwen2 config.json: Llama with a bias on the q/k/v projections."""
    fields = base_fields(hf, architecture)
    fields["qkv_bias"] = True
    return ModelConfig(**fields, layer_windows=qwen_layer_windows(hf, fields["num_layers"]))
