"""``kv_transfer_params``: what the router, the prefill worker and the decode worker pass one another.

Wire format (vLLM's NIXL connector shape, unchanged): the router sends ``{"do_remote_decode": true}`` to the
prefill worker; the prefill worker answers with ``do_remote_prefill``, ``remote_engine_id``, ``remote_host``,
``remote_port``, ``remote_block_ids``, ``remote_request_id``, ``num_prompt_tokens``, ``block_size``,
``lease_seconds``, ``lease_expires_at`` and its first sampled token (``first_token_id``, and
``first_token_logprobs`` keyed by token id strings); the router hands that to the decode worker.

Parsed once at each HTTP edge into ``KVTransferParams``: a field of the wrong type is a 400 naming it
(``kv_transfer_params.remote_port: ...``). A missing remote field is not an error here: the decode worker then
computes the prompt itself (the connector decides). Fields of other connectors (vLLM's ``tp_size``, ...) are
kept in ``extra`` and passed on unchanged: the router relays them between vLLM workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_BOOL_FIELDS = ("do_remote_decode", "do_remote_prefill")
_STR_FIELDS = ("remote_engine_id", "remote_host", "remote_request_id")
_INT_FIELDS = ("remote_port", "num_prompt_tokens", "block_size", "first_token_id")
_NUMBER_FIELDS = ("lease_seconds", "lease_expires_at")
_FIELDS = (*_BOOL_FIELDS, *_STR_FIELDS, *_INT_FIELDS, *_NUMBER_FIELDS, "remote_block_ids", "first_token_logprobs")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class KVTransferParams:
    """Typed ``kv_transfer_params``; ``to_dict`` gives the wire format back."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_block_ids: tuple[int, ...] | None = None
    remote_request_id: str | None = None
    num_prompt_tokens: int | None = None
    block_size: int | None = None
    lease_seconds: float | None = None
    lease_expires_at: float | None = None  # unix time after which the prefill worker may free the blocks
    first_token_id: int | None = None
    first_token_logprobs: dict[int, float] | None = None
    extra: dict[str, Any] | None = None  # other connectors' fields, relayed as they came

    @classmethod
    def parse(cls, raw: Any) -> "KVTransferParams | None":
        """Parse the wire dict (None stays None). Raises ValueError naming ``kv_transfer_params.<field>``."""
        if raw is None:
            return None
        if isinstance(raw, KVTransferParams):
            return raw
        if not isinstance(raw, dict):
            raise ValueError("kv_transfer_params: must be an object")
        values: dict[str, Any] = {}
        extra = {k: v for k, v in raw.items() if k not in _FIELDS}
        for name, value in raw.items():
            if value is not None and name in _FIELDS:
                values[name] = _check(name, value)
        return cls(**values, extra=extra or None)

    def to_dict(self) -> dict[str, Any]:
        """The wire format (fields that are unset are left out)."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            if name in _BOOL_FIELDS:
                if value or name == "do_remote_decode" and self.do_remote_prefill:
                    out[name] = value
                continue
            if value is None:
                continue
            if name == "remote_block_ids":
                value = list(value)
            elif name == "first_token_logprobs":
                value = {str(t): lp for t, lp in value.items()}
            out[name] = value
        return {**out, **(self.extra or {})}


def _check(name: str, value: Any) -> Any:
    where = f"kv_transfer_params.{name}"
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be a boolean")
        return value
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"{where}: must be a string")
        return value
    if name in _INT_FIELDS:
        if not _is_int(value) or value < 0:
            raise ValueError(f"{where}: must be a non-negative integer")
        if name == "remote_port" and not 0 < value <= 65535:
            raise ValueError(f"{where}: {value} is not a port")
        return value
    if name in _NUMBER_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: must be a number")
        return value
    if name == "remote_block_ids":
        if not isinstance(value, list) or not all(_is_int(b) and b >= 0 for b in value):
            raise ValueError(f"{where}: must be a list of non-negative integers")
        return tuple(value)
    # first_token_logprobs
    try:
        return {int(t): float(lp) for t, lp in value.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{where}: must map token ids to logprobs") from None
