"""Sampling parameters of one request, in the shape vLLM users know (validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.protocol.structured_output import StructuredOutputSpec


@dataclass(slots=True)
class SamplingParams:
    """How to sample a completion. Invalid values raise ``ValueError`` naming the field.

    ``temperature == 0`` means greedy. ``seed`` makes a request reproducible on its own, whatever
    else is in the batch. ``stop`` strings are not included in the output text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutputSpec | None = None
    logit_bias: dict[int, float] | None = None
    # A resumed stream (tandem.protocol.continuation): the prompt's last this many tokens are the request's own
    # earlier output, so penalties count them as output and seeded sampling skips their draws.
    prior_output_tokens: int = 0

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is not None and self.top_k <= 0:
            self.top_k = None  # vLLM treats -1/0 as "all tokens"
        self.logit_bias = _parse_logit_bias(self.logit_bias)
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputSpec):
            raise ValueError(f"structured_output: must be a StructuredOutputSpec, got {self.structured_output!r}")
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if not isinstance(self.prior_output_tokens, int) or self.prior_output_tokens < 0:
            raise bad("prior_output_tokens", "must be an integer >= 0")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {self.MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes) -> "SamplingParams":
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        values["logit_bias"] = None if self.logit_bias is None else dict(self.logit_bias)
        values.update(changes)
        return SamplingParams(**values)


def _parse_logit_bias(raw: object) -> dict[int, float] | None:
    """``{token_id: bias}`` with int ids (JSON's string keys such as ``"42"`` accepted) and biases in
    [-100, 100]; an empty map is None. Raises ValueError naming ``logit_bias``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"logit_bias: must map token ids to biases, got {raw!r}")
    limit = SamplingParams.MAX_LOGIT_BIAS
    bias: dict[int, float] = {}
    for key, value in raw.items():
        token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias: keys must be token ids (integers >= 0), got {key!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not -limit <= value <= limit:
            raise ValueError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}")
        bias[token] = float(value)
    return bias or None
