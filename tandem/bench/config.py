"""What a benchmark run is asked to do: one validated, slotted dataclass plus the SLO parser.

Everything a user can get wrong (a missing dataset file, a bad ``--goodput`` spec, a negative rate)
raises :class:`BenchError` with a message meant for a person; the CLI prints it without a traceback.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

DATASETS = ("random", "shared-prefix", "sharegpt")
ENDPOINTS = ("completions", "chat")

# SLO keys accepted by ``--goodput`` (same names as vLLM's benchmark), values in milliseconds.
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


class BenchError(ValueError):
    """A user-facing error: bad input or an unusable dataset. The message is shown as is."""


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """Parse ``["ttft:500", "tpot:50"]`` into ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds).

    Raises :class:`BenchError` for an unknown key, a missing colon, a non-number or a value <= 0.
    """
    slo: dict[str, float] = {}
    for spec in specs or []:
        key, sep, value = spec.partition(":")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise BenchError(f"bad --goodput spec {spec!r}: expected KEY:MILLISECONDS, e.g. ttft:500")
        if key not in GOODPUT_KEYS:
            raise BenchError(f"bad --goodput key {key!r} in {spec!r}: choose from {', '.join(GOODPUT_KEYS)}")
        try:
            limit_ms = float(value)
        except ValueError:
            raise BenchError(f"bad --goodput value {value!r} in {spec!r}: not a number of milliseconds") from None
        if not math.isfinite(limit_ms) or limit_ms <= 0:
            raise BenchError(f"bad --goodput value in {spec!r}: must be a positive number of milliseconds")
        if key in slo:
            raise BenchError(f"--goodput key {key!r} given twice")
        slo[key] = limit_ms
    return slo


@dataclass(slots=True)
class BenchConfig:
    """One benchmark run against one OpenAI-compatible endpoint.

    ``request_rate`` is requests per second of a Poisson arrival process (``inf``: send all at once);
    ``max_concurrency`` caps the requests in flight (None: no cap). Both may be combined.
    Lengths are in tokens; without ``tokenizer`` they are approximated by words (see docs/bench.md).
    ``output_len`` None means the dataset's default (128 for the synthetic sets, the recorded reply's
    length for ShareGPT).
    """

    base_url: str
    model: str
    api_key: str | None = None
    endpoint: str = "completions"
    dataset: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 100
    request_rate: float = math.inf
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int | None = None
    range_ratio: float = 0.0
    prefix_len: int = 512
    num_prefixes: int = 4
    seed: int = 0
    tokenizer: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 600.0
    goodput: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise BenchError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        if not self.model:
            raise BenchError("--model must not be empty")
        if self.endpoint not in ENDPOINTS:
            raise BenchError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise BenchError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "sharegpt":
            if not self.dataset_path:
                raise BenchError("--dataset sharegpt needs --dataset-path FILE (a ShareGPT JSON file)")
            if not os.path.isfile(self.dataset_path):
                raise BenchError(f"dataset file not found: {self.dataset_path}")
        if self.num_prompts < 1:
            raise BenchError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if math.isnan(self.request_rate) or self.request_rate <= 0:
            raise BenchError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise BenchError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.input_len < 1:
            raise BenchError(f"--input-len must be >= 1, got {self.input_len}")
        if self.output_len is not None and self.output_len < 1:
            raise BenchError(f"--output-len must be >= 1, got {self.output_len}")
        if self.prefix_len < 0:
            raise BenchError(f"--prefix-len must be >= 0, got {self.prefix_len}")
        if self.num_prefixes < 1:
            raise BenchError(f"--num-prefixes must be >= 1, got {self.num_prefixes}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise BenchError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise BenchError(f"tokenizer not found: {self.tokenizer} (a tokenizer.json or a folder holding one)")
        if self.temperature < 0:
            raise BenchError(f"--temperature must be >= 0, got {self.temperature}")
        if self.timeout_s <= 0:
            raise BenchError(f"--timeout must be > 0, got {self.timeout_s}")
        for key in self.goodput:
            if key not in GOODPUT_KEYS:
                raise BenchError(f"goodput key {key!r} unknown: choose from {', '.join(GOODPUT_KEYS)}")
