"""Qwen3 (dense): the Llama layer with an RMSNorm over each head's query and key before RoPE, and no q/k/v bias
(unless the config's ``attention_bias`` asks for one)."""

from __future__ import annotations

from tandem.engine.models.config import ModelConfig, base_fields
from tandem.engine.models.llama import LlamaForCausalLM, qwen_layer_windows


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3's decoder: Llama's layers with ``qk_norm`` (``SelfAttention`` builds the per-head norms)."""


def qwen3_config(hf: dict, architecture: str) -> ModelConfig:
    fields = base_fields(hf, architecture)
    return ModelConfig(**fields, qk_norm=True, layer_windows=qwen_layer_windows(hf, fields["num_layers"]))
