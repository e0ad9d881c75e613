"""Engine configuration: slotted dataclasses validated on construction, with tiny presets for tests."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


GIB = 1 << 30
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value (9223372036854771712); any limit
# this large is no limit.
CGROUP_V1_UNLIMITED = 1 << 62
DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """A memory size and where it was read (for the start-up log)."""

    num_bytes: int
    source: str  # e.g. "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes", "host RAM"


@dataclass(frozen=True, slots=True)
class KVCacheSize:
    """The KV cache's size in bytes and the sentence saying how it was chosen (logged at start-up)."""

    num_bytes: int
    explanation: str
    fraction: float | None = None  # set when the size is a fraction of a memory limit


def parse_memory(value: str | int | float, total_bytes: int | None = None) -> int:
    """Parse '2GiB', '512MB', '1e9', 0.25 (a fraction of the memory limit, see :func:`memory_limit`) or a
    plain byte count into bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 1:
            return int(value * (total_bytes or memory_limit().num_bytes))
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "k": 2**10,
             "m": 2**20, "g": 2**30, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    number = float(text)
    return parse_memory(number, total_bytes)


def kv_cache_size(value: str | int | float, limit: MemoryLimit | None = None) -> KVCacheSize:
    """``--kv-cache-memory``: a size, or a fraction of ``limit`` (default: :func:`memory_limit`), explained.

    Raises ValueError naming the flag for anything that is neither.
    """
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = None
    if fraction is not None and 0 < fraction < 1:
        limit = limit or memory_limit()
        num_bytes = int(fraction * limit.num_bytes)
        return KVCacheSize(num_bytes, f"KV cache: {fraction:g} x {limit.source} {_gib(limit.num_bytes)} = "
                                      f"{_gib(num_bytes)}", fraction)
    try:
        num_bytes = parse_memory(value)
    except ValueError:
        raise ValueError(f"kv_cache_memory: expected a size ('2GiB', '512MB', bytes) or a fraction in (0, 1) of "
                         f"the memory limit, got {value!r}") from None
    return KVCacheSize(num_bytes, f"KV cache: {_gib(num_bytes)} (kv_cache_memory)")


def _gib(num_bytes: int) -> str:
    """A size for the log: GiB with one decimal, MiB below one GiB."""
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / 2**20:.0f} MiB"


def memory_limit(cgroup_root: Path | None = None, proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> MemoryLimit:
    """The memory this process may use: its container's limit (cgroup v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``), or the host's RAM when no limit is set or the limit exceeds it.

    ``cgroup_root`` defaults to ``TANDEM_CGROUP_ROOT`` or /sys/fs/cgroup (tests point it at a laid-out tree).
    """
    root = cgroup_root or Path(os.environ.get("TANDEM_CGROUP_ROOT") or DEFAULT_CGROUP_ROOT)
    host = MemoryLimit(_total_ram(), "host RAM")
    limit = cgroup_memory_limit(root, proc_self_cgroup)
    return limit if limit is not None and limit.num_bytes < host.num_bytes else host


def cgroup_memory_limit(root: Path, proc_self_cgroup: Path) -> MemoryLimit | None:
    """The tightest memory limit on this process's cgroup and its ancestors under ``root``; None when unlimited.

    cgroup v2 (``root/cgroup.controllers`` exists): ``memory.max`` ("max" = none). cgroup v1: the memory
    controller's ``memory.limit_in_bytes`` under ``root/memory``. The process's own cgroup is read from
    ``/proc/self/cgroup`` (``0::/path`` in v2, ``N:memory:/path`` in v1); when that path is not visible under
    the root (a container's private view of its cgroup, mounted as the root), the root's own file is read.
    """
    membership = _read(proc_self_cgroup) or ""
    if (root / "cgroup.controllers").exists():
        base, filename, version = root, "memory.max", "v2"
        own = next((line.split(":", 2)[2] for line in membership.splitlines() if line.startswith("0::")), "/")
    else:
        base, filename, version = root / "memory", "memory.limit_in_bytes", "v1"
        own = next((line.split(":", 2)[2] for line in membership.splitlines()
                    if len(line.split(":", 2)) == 3 and "memory" in line.split(":", 2)[1].split(",")), "/")
    limits = [value for directory in _cgroup_chain(base, own) if (value := _limit_in(directory / filename))]
    if not limits:
        return None
    return MemoryLimit(min(limits), f"cgroup {version} {filename}")


def _cgroup_chain(base: Path, own: str) -> list[Path]:
    """``base/own`` and its ancestors up to ``base`` (just ``base`` when ``own`` is not visible there)."""
    directory = base / own.strip("/")
    if not own.strip("/") or not directory.is_dir():
        return [base]
    chain = [directory]
    while chain[-1] != base:
        chain.append(chain[-1].parent)
    return chain


def _limit_in(path: Path) -> int | None:
    """A limit file's value in bytes; None for a missing file, "max", or v1's huge "no limit"."""
    text = (_read(path) or "").strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value < CGROUP_V1_UNLIMITED else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def gpu_kv_cache_size(total_bytes: int, utilization: float, in_use_bytes: int, activation_bytes: int) -> KVCacheSize:
    """The KV cache on a GPU, as vLLM sizes it: ``utilization`` of the GPU's memory is the engine's, and the KV
    cache gets what is left of it after what is already in use (weights, CUDA context) and the activations.

    Raises ValueError naming gpu_memory_utilization when nothing is left.
    """
    budget = int(utilization * total_bytes)
    num_bytes = budget - in_use_bytes - activation_bytes
    if num_bytes <= 0:
        raise ValueError(
            f"gpu_memory_utilization: {utilization:g} x {_gib(total_bytes)} = {_gib(budget)} leaves nothing for the "
            f"KV cache after {_gib(in_use_bytes)} in use and {_gib(activation_bytes)} of activations; raise it "
            "or give kv_cache_memory"
        )
    return KVCacheSize(num_bytes, f"KV cache: {utilization:g} x GPU memory {_gib(total_bytes)} - "
                                  f"{_gib(in_use_bytes)} in use (weights, CUDA context) - {_gib(activation_bytes)} "
                                  f"activations = {_gib(num_bytes)}")


def activation_bytes_estimate(max_num_batched_tokens: int, max_num_seqs: int, hidden_size: int,
                              intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                              vocab_size: int, dtype_bytes: int) -> int:
    """An upper estimate of one step's activations on a GPU: per scheduled token, the residual stream and its
    norm, q/k/v and the attention output, the gated MLP's two intermediate tensors and its input and output
    (one layer at a time: layers reuse that memory); plus float32 logits for every sequence sampled."""
    per_token = (4 * hidden_size + (num_heads + 2 * num_kv_heads) * head_dim + num_heads * head_dim
                 + 3 * intermediate_size) * dtype_bytes
    return max_num_batched_tokens * per_token + max_num_seqs * vocab_size * 4


def measure_gpu_kv_cache_size(device, utilization: float, activation_bytes: int) -> KVCacheSize:
    """:func:`gpu_kv_cache_size` with the GPU's total and in-use memory read now (after the weights loaded).

    NOTE: torch is imported here, not at module level: this module is imported where torch must not be.
    """
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return gpu_kv_cache_size(total, utilization, total - free, activation_bytes)


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = 1 GiB on CPU, gpu_memory_utilization's share on CUDA
    num_blocks: int | None = None  # overrides kv_cache_memory (tests)
    enable_prefix_caching: bool = True
    kv_keep_warm_interval_s: float = 5.0  # 0 = off; see LLMEngine.keep_kv_cache_warm
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # CUDA: see gpu_kv_cache_size

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
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
    """The step's limits. ``max_long_partial_prefills``: at most this many requests with at least
    ``long_prefill_token_threshold`` prompt tokens still to compute get prefill tokens in one step (vLLM's names);
    later long prompts wait, shorter ones behind them go first. One long prefill at a time finishes each sooner
    (a 1,000-token chunk already keeps the matmuls at full rate) instead of splitting every step between several.
    Threshold 0: a quarter of ``max_num_batched_tokens``."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_model_len: int = 4096
    max_long_partial_prefills: int = 1
    long_prefill_token_threshold: int = 0

    @property
    def long_prefill_tokens(self) -> int:
        """Prompt tokens still to compute from which a prefill counts as long."""
        return self.long_prefill_token_threshold or max(1, self.max_num_batched_tokens // 4)

    def __post_init__(self) -> None:
        if self.max_long_partial_prefills < 1:
            raise ValueError(f"max_long_partial_prefills: must be >= 1, got {self.max_long_partial_prefills}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold: must be >= 0, got {self.long_prefill_token_threshold}")
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
    attention_backend: str = "auto"  # auto | torch | cpu-paged (see attention/backend.py select_backend)

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"dtype: must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "cpu-paged"):
            raise ValueError(f"attention_backend: must be auto, torch or cpu-paged, got {self.attention_backend!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
