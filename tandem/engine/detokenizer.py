"""Incremental detokenization and stop strings that are correct across token boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class DetokenizerState:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: int = 0  # characters of ``text`` already handed out (streaming holds back a stop prefix)


class IncrementalDetokenizer:
    """Decodes tokens as they arrive; a token that ends mid-character waits for its continuation."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, state: DetokenizerState, new_ids: list[int]) -> str:
        """Append tokens; returns the newly decodable text (may be empty)."""
        state.token_ids.extend(new_ids)
        ids = state.token_ids
        prefix_text = self._decode(ids[state.prefix_offset : state.read_offset])
        new_text = self._decode(ids[state.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            state.prefix_offset, state.read_offset = state.read_offset, len(ids)
            state.text += delta
            return delta
        return ""


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last ``new_len`` characters: (index in text, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
