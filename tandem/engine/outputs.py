"""What the engine hands back: per-step deltas (for streaming) and final outputs (for ``LLM``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestDelta:
    """New tokens of one sample (``index`` of ``n``) of a request after one engine step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None
    queue_time: float | None = None  # seconds from arrival to first schedule, on the first delta only
    # vLLM's request phases, in seconds: first schedule -> first token (on the first token's delta; not for a
    # first token computed by a remote prefill), first token -> last, first schedule -> last (on the final delta).
    prefill_time: float | None = None
    decode_time: float | None = None
    inference_time: float | None = None
    error: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """The whole result of one prompt, in the shape of vLLM's ``RequestOutput``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None
