"""Mistral: the Llama layer with a sliding window on every layer when the config sets ``sliding_window``
(Mistral 7B v0.1: 4,096; later versions set it to null and attend fully)."""

from __future__ import annotations

from tandem.engine.models.config import ModelConfig, base_fields
from tandem.engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral's decoder: Llama's layers; the window comes from the config (``ModelConfig.layer_windows``)."""


def mistral_config(hf: dict, architecture: str) -> ModelConfig:
    fields = base_fields(hf, architecture)
    window = hf.get("sliding_window")
    windows = (window,) * fields["num_layers"] if window is not None else ()
    return ModelConfig(**fields, layer_windows=windows)
