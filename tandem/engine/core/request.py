"""A request as the engine core sees it: token ids, progress counters, status and its block hashes."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from tandem.protocol.hashing import hash_block
from tandem.engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything above ``PREEMPTED`` is finished."""

    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()
    WAITING_FOR_GRAMMAR = enum.auto()  # its structured output grammar is still compiling
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class GrammarState(Protocol):
    """What the core needs of a sequence's structured output grammar (``engine/structured_output``)."""

    @property
    def ready(self) -> bool:
        """Compiling is over (successfully, or see ``error``)."""

    @property
    def error(self) -> str | None:
        """Why compiling failed, naming the request field."""

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and accepted its stop token."""

    def accept(self, token_id: int) -> bool:
        """Advance over a generated token; False if the grammar forbids it."""

    def valid_prefix(self, tokens: list[int]) -> list[int]:
        """The longest prefix of draft tokens the grammar allows (no net state change)."""


@dataclass(eq=False)
class Request:
    """One sequence. ``num_computed_tokens`` of ``all_token_ids`` have KV in the cache.

    NOTE: scheduling follows from two numbers only: ``num_tokens`` and ``num_computed_tokens``.
    A prompt chunk, a prefix hit and a decode step are all "compute the next tokens up to num_tokens".
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    block_size: int = 16
    extra_keys: tuple | None = None
    # Set for n > 1 children: siblings wait until the first child's prompt is cached, then share it.
    group_id: str | None = None
    # Disaggregation: parameters of the remote prefill (decode side) or the request to export (prefill side).
    kv_transfer_params: dict | None = None
    # Structured output: this sequence's own grammar state (n > 1 samples each have one), or None.
    grammar: GrammarState | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    # Output tokens sampled elsewhere and handed in with the request (disaggregated decode: the prefill
    # worker's first token); the sampler skips their random draws so a seeded request continues its stream.
    num_preseeded_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)
    # Per output token: {token_id: logprob} of the chosen and top tokens, when logprobs were asked.
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self._update_block_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        # Hash every newly completed full block (chained), as tokens arrive.
        bs = self.block_size
        while (len(self.block_hashes) + 1) * bs <= len(self.all_token_ids):
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block(parent, self.all_token_ids[i * bs : (i + 1) * bs], self.extra_keys))

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
