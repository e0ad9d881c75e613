"""The engine side of mid-stream migration (the contract is in ``tandem.protocol.continuation``): a resumed
request's prompt and sampling overrides, dropping the text its client already has, and token ids on choices."""

from __future__ import annotations

from typing import Any

from tandem.protocol.continuation import Continuation


def continuation_overrides(continuation: Continuation | None) -> dict[str, Any]:
    """``SamplingParams`` overrides of a resumed request (none for a fresh one)."""
    return {"prior_output_tokens": continuation.num_output_tokens} if continuation is not None else {}


def check_resumable(continuation: Continuation | None, n: int, *, tools: bool = False, echo: bool = False) -> None:
    """A continuation resumes one sample, without tools (their parser reads the whole text): ValueError naming
    the field otherwise. Structured output resumes: the engine advances the grammar over the earlier output."""
    if continuation is None:
        return
    if n != 1:
        raise ValueError("tandem_continuation: only a single-choice request (n == 1) can be resumed")
    if tools:
        raise ValueError("tandem_continuation: a request with tools cannot be resumed")
    if echo:
        raise ValueError("tandem_continuation: an echoed prompt cannot be resumed")


class SeenText:
    """Drops, per choice, the first ``num_output_chars`` characters of a resumed request's text (the engine
    re-emits its earlier output; the client already has that much of it)."""

    __slots__ = ("_left",)

    def __init__(self, continuation: Continuation | None) -> None:
        self._left: dict[Any, int] = {}
        if continuation is not None and continuation.num_output_chars:
            self._left = {None: continuation.num_output_chars}

    def new(self, key: Any, text: str) -> str:
        """The part of ``text`` (the next piece of choice ``key``'s output) the client has not seen."""
        if not self._left:
            return text
        left = self._left.get(key, self._left.get(None, 0))
        if not left:
            return text
        cut = min(left, len(text))
        self._left[key] = left - cut
        return text[cut:]


def with_token_ids(choice: dict[str, Any], token_ids: list[int], wanted: bool) -> dict[str, Any]:
    """``choice`` carrying its ``token_ids`` when the request asked for them (``return_token_ids``)."""
    if wanted:
        choice["token_ids"] = list(token_ids)
    return choice
