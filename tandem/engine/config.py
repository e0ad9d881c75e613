"""Engine configuration: slotted dataclasses validated on construction, with tiny presets for tests."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


def parse_memory(value: str | int | float, total_bytes: int | None = None) -> int:
    """Parse '2GiB', '512MB', '1e9', 0.25 (a fraction of RAM) or a plain byte count into bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 1:
            return int(value * (total_bytes or _total_ram()))
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "k": 2**10,
             "m": 2**20, "g": 2**30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    number = float(text)
    return parse_memory(number, total_bytes)


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = a default share of RAM
    num_blocks: int | None = None  # overrides kv_cache_memory (tests)
    enable_prefix_caching: bool = True
    kv_keep_warm_interval_s: float = 5.0  # 0 = off; see LLMEngine.keep_kv_cache_warm

    def __post_init__(self) -> None:
        if self.kv_keep_warm_interval_s < 0:
            raise ValueError(f"kv_keep_warm_interval_s: must be >= 0, got {self.kv_keep_warm_interval_s}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size: must be a power of two in [1, 128], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory: must be > 0, got {self.kv_cache_memory}")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens: without chunked prefill it must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram prompt lookup (vLLM's ``{"method": "ngram", ...}``).

    Each decode step proposes up to ``num_speculative_tokens`` tokens by finding the sequence's last n tokens
    (``prompt_lookup_max`` down to ``prompt_lookup_min``) earlier in its prompt or output and copying what
    followed; one forward pass verifies them all. Greedy output is unchanged; sampled output keeps its
    distribution (rejection sampling). Pays where outputs repeat their input (edits, extraction, code, RAG).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # Stop speculating while more than this many requests run (verification costs compute a big batch lacks).
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config.method: only 'ngram' is supported, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"speculative_config.num_speculative_tokens: must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"speculative_config.disable_by_batch_size: must be >= 1, got {self.disable_by_batch_size}")

    @classmethod
    def from_dict(cls, raw: dict) -> "SpeculativeConfig":
        unknown = set(raw) - {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                              "disable_by_batch_size"}
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**raw)


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"dtype: must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
