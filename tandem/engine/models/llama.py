"""The Llama family (Llama 2/3, SmolLM2) and Qwen2, which is Llama with a q/k/v bias.

Pre-norm decoder layers: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``, SiLU-gated MLP, RoPE on every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.common import DecoderLM, GatedMLP, RMSNorm, Rope, SelfAttention
from tandem.engine.models.config import ModelConfig, base_fields, hf_layer_windows


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
