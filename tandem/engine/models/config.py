"""The model configuration every family builds from its Hugging Face ``config.json`` (see ``registry.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ModelConfig:
    """A decoder-only transformer's shape and the variations the supported families need."""

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
    # Per layer: its sliding window (a query sees this many keys ending at itself) or None for full attention.
    # Empty means every layer attends fully.
    layer_windows: tuple[int | None, ...] = ()
    qk_norm: bool = False  # RMSNorm of each head's query and key before RoPE (Qwen3, Gemma 3)
    attn_scale: float | None = None  # multiplies q.k; None = head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"  # of the gated MLP: "silu" or "gelu_tanh"
    # Sliding-window layers' RoPE when it differs from the full-attention layers' (Gemma 3's local base).
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    # Where the text decoder's tensors may sit in the checkpoint; loading uses the first the file has.
    weight_prefixes: tuple[str, ...] = ("model.",)
    lm_head_names: tuple[str, ...] = ("lm_head.weight",)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows: {len(self.layer_windows)} entries for {self.num_layers} layers")
        for window in self.layer_windows:
            if window is not None and window < 1:
                raise ValueError(f"sliding_window: must be >= 1, got {window}")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act: unsupported activation {self.hidden_act!r}")

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window, or None if it attends to every key before it."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct attention windows the layers use (None: full attention), in first-use order."""
        return tuple(dict.fromkeys(self.window(i) for i in range(self.num_layers)))

    @property
    def release_window(self) -> int | None:
        """When every layer slides: the widest window, beyond which a request's blocks can be given back to the
        pool. None when any layer attends fully (its keys are needed to the end)."""
        windows = [self.window(i) for i in range(self.num_layers)]
        if not windows or any(w is None for w in windows):
            return None
        return max(windows)


def hf_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling or None) from a config.json in either the older (``rope_theta``/``rope_scaling``)
    or the newer (``rope_parameters``) spelling."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return rope.get("rope_theta", hf.get("rope_theta", 10000.0)), scaling


def hf_layer_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer windows from ``layer_types`` (transformers' own spelling), if the config lists them and has a
    sliding window; () when every layer attends fully."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if window is None or not types:
        return ()
    if len(types) != num_layers:
        raise ValueError(f"layer_types: {len(types)} entries for {num_layers} layers")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer_types: unsupported layer type(s) {', '.join(sorted(unknown))}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def base_fields(hf: dict, architecture: str) -> dict:
    """The fields every family reads the same way from a config.json."""
    heads = hf["num_attention_heads"]
    theta, scaling = hf_rope(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=bool(hf.get("attention_bias", False)),
        architecture=architecture,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
