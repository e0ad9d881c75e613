"""The model registry: a checkpoint's architecture (config.json ``architectures[0]``) -> its family's model class
and config reader. One family per module in this package."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tandem.engine.models.common import DecoderLM
from tandem.engine.models.config import ModelConfig
from tandem.engine.models.gemma3 import Gemma3ForCausalLM, gemma3_config
from tandem.engine.models.llama import LlamaForCausalLM, llama_config, qwen2_config
from tandem.engine.models.mistral import MistralForCausalLM, mistral_config
from tandem.engine.models.qwen3 import Qwen3ForCausalLM, qwen3_config


@dataclass(frozen=True, slots=True)
class Family:
    """How to serve one architecture: its model class and how to read its config.json."""

    model_class: type[DecoderLM]
    read_config: Callable[[dict, str], ModelConfig]
    model_types: tuple[str, ...]  # config.json ``model_type`` values, for configs that omit ``architectures``


ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family(LlamaForCausalLM, llama_config, ("llama",)),
    "Qwen2ForCausalLM": Family(LlamaForCausalLM, qwen2_config, ("qwen2",)),
    "MistralForCausalLM": Family(MistralForCausalLM, mistral_config, ("mistral",)),
    "Qwen3ForCausalLM": Family(Qwen3ForCausalLM, qwen3_config, ("qwen3",)),
    "Gemma3ForCausalLM": Family(Gemma3ForCausalLM, gemma3_config, ("gemma3_text",)),
    "Gemma3ForConditionalGeneration": Family(Gemma3ForCausalLM, gemma3_config, ("gemma3",)),
}

# Tiny configurations for tests and ``--model preset:NAME`` (randomly initialised): gpt-fast style named presets.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", **_TINY, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "tiny-qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **_TINY, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    "tiny-qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", **_TINY, head_dim=32,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny-mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", **_TINY, rope_theta=10000.0,
                         sliding_window=16, tie_word_embeddings=False),
    "tiny-gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", **_TINY, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=16, layer_types=["sliding_attention",
                        "full_attention"], tie_word_embeddings=True),
}


def resolve_family(hf: dict) -> tuple[str, Family]:
    """The architecture named by a config.json and its family; an unsupported one raises ValueError naming it
    and the supported list."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if archs:
        arch = archs[0]
    else:
        by_type = {t: name for name, fam in ARCHITECTURES.items() for t in fam.model_types}
        arch = by_type.get(model_type or "", model_type)
    family = ARCHITECTURES.get(arch or "")
    if family is None:
        raise ValueError(f"unsupported architecture {arch or archs or model_type!r}: Tandem serves "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return arch, family


def config_from_hf(hf: dict) -> ModelConfig:
    """The ``ModelConfig`` of a config.json dict; unsupported architectures or fields raise ValueError."""
    arch, family = resolve_family(hf)
    try:
        return family.read_config(hf, arch)
    except KeyError as exc:
        raise ValueError(f"config.json: missing field {exc.args[0]!r} for {arch}") from None


def build_model(cfg: ModelConfig) -> DecoderLM:
    """A model of ``cfg``'s family with torch's default initial weights (the presets draw their own)."""
    return ARCHITECTURES[cfg.architecture].model_class(cfg)


def build_model_skeleton(cfg: ModelConfig) -> DecoderLM:
    """A model of ``cfg``'s family on the meta device, nothing initialised: a checkpoint's weights follow.

    NOTE: the modules' ``reset_parameters`` would draw random weights into meta tensors, which torch runs
    through its Python reference ops; importing those pulls in ``torch._dynamo`` (1.2 s here) and, where
    installed, triton, whose bindings print pages of "nanobind: leaked" lines when every worker exits.
    """
    with torch.device("meta"), _initialisers_skipped():
        return build_model(cfg)


_INITIALISERS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
