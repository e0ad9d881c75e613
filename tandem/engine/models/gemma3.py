"""Gemma 3 (text): the text decoder of ``Gemma3ForCausalLM`` and of ``Gemma3ForConditionalGeneration`` (whose
vision tower is not loaded).

What differs from Llama: sliding-window layers mixed with global ones (``layer_types``, or every
``sliding_window_pattern``-th layer global), local and global RoPE bases, the ``x * (1 + w)`` RMSNorm, q/k norms,
embeddings scaled by ``sqrt(hidden_size)``, scores scaled by ``query_pre_attn_scalar ** -0.5``, optional attention
and final logit softcapping, a GELU-tanh gated MLP, and norms after attention and around the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.models.common import DecoderLM, GatedMLP, GemmaRMSNorm, Rope, SelfAttention
from tandem.engine.models.config import ModelConfig, base_fields, hf_layer_windows

# Gemma3TextConfig's defaults, for the fields a Hub config.json may leave out (its text_config often does).
TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
    eos_token_id=1, bos_token_id=2,
)
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}


class Gemma3DecoderLayer(nn.Module):
    """``h + post_attn_norm(attn(input_norm(h)))`` then ``h + post_ff_norm(mlp(pre_ff_norm(h)))``."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = SelfAttention(cfg, index, GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, h: torch.Tensor, rope: Rope, kv_rows: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), rope, kv_rows, meta, backend)
        h = h + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(DecoderLM):
    """Gemma 3's text decoder over the paged KV cache."""

    norm_class = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.embed_scale = cfg.hidden_size**0.5

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return Gemma3DecoderLayer(cfg, index)


def _rope(params: dict | None, theta: float) -> tuple[float, dict | None]:
    params = params or {}
    scaling = params if params.get("rope_type", "default") != "default" else None
    return params.get("rope_theta", theta), scaling


def gemma3_config(hf: dict, architecture: str) -> ModelConfig:
    """A Gemma 3 config.json: the text model's own (``gemma3_text``) or a multimodal one's ``text_config``."""
    multimodal = "text_config" in hf
    text = {**TEXT_DEFAULTS, **((hf.get("text_config") or {}) if multimodal else hf)}
    for key in ("bos_token_id", "eos_token_id", "tie_word_embeddings"):  # a multimodal config keeps these on top
        if multimodal and key in hf:
            text[key] = hf[key]
    if text.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: bidirectional Gemma 3 (an embedding model) is not served")
    act = text.get("hidden_activation") or text.get("hidden_act")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_activation: unsupported {act!r} for Gemma 3 (supported: {', '.join(ACTIVATIONS)})")
    fields = base_fields(text, architecture)
    rope = text.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers >= 5: one RoPE per layer type
        fields["rope_theta"], fields["rope_scaling"] = _rope(rope["full_attention"], GLOBAL_THETA)
        local_theta, local_scaling = _rope(rope.get("sliding_attention"), LOCAL_THETA)
    else:
        fields["rope_theta"] = text.get("rope_theta", GLOBAL_THETA)
        fields["rope_scaling"] = text.get("rope_scaling")
        local_theta, local_scaling = text.get("rope_local_base_freq", LOCAL_THETA), None
    num_layers = fields["num_layers"]
    if text.get("layer_types"):
        windows = hf_layer_windows(text, num_layers)
    else:
        pattern = text.get("sliding_window_pattern", 6)
        windows = tuple(text["sliding_window"] if (i + 1) % pattern else None for i in range(num_layers))
    return ModelConfig(
        **fields,
        layer_windows=windows,
        qk_norm=True,
        attn_scale=text["query_pre_attn_scalar"] ** -0.5,
        attn_logit_softcapping=text.get("attn_logit_softcapping"),
        final_logit_softcapping=text.get("final_logit_softcapping"),
        hidden_act=ACTIVATIONS[act],
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        weight_prefixes=("model.language_model.", "language_model.model.") if multimodal else ("model.",),
        lm_head_names=("lm_head.weight", "language_model.lm_head.weight") if multimodal else ("lm_head.weight",),
    )
