"""Mid-stream migration: what the router keeps of a relayed stream, and how it resumes it on another worker.

The router asks the engine for the generated token ids (``return_token_ids``, vLLM's request field: vLLM and
our engine both put ``token_ids`` on every choice and ``prompt_token_ids`` on the first chunk). It strips them
before the client sees them, unless the client asked for them itself. When the upstream fails mid-stream,
the request resumes elsewhere as a continuation (``tandem_continuation``, an internal request field our engine
understands): the prompt's token ids plus the tokens generated so far, with ``max_tokens`` and ``min_tokens``
reduced by what was generated, how many trailing prompt tokens are earlier output (penalties count them as
output, the detokenizer and stop strings see them as the text so far) and how many characters of that text the
client already has (text an engine held back as a possible stop string is sent after the seam, not lost).

NOTE: only single-choice requests without tools or structured output migrate (``n == 1``, one prompt): a
failure of any other stream ends it with an error event, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from tandem.protocol.continuation import CONTINUATION_FIELD, RETURN_TOKEN_IDS

# Fields that make a request's output depend on state a continuation cannot rebuild yet (the engine's tool-call
# parser reads the whole text): such streams end with an error event if their worker fails, as before.
# Structured output resumes: the engine advances the grammar over the earlier output.
_UNRESUMABLE = ("tools", "functions")

DONE = b"data: [DONE]\n\n"


class StreamFailed(Exception):
    """The upstream stream ended without completing: ``reason`` is the migration metric's label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def migratable(body: dict[str, Any]) -> bool:
    """True for requests whose stream the router can resume: one choice of one prompt."""
    if any(body.get(name) for name in _UNRESUMABLE):
        return False
    n = body.get("n", 1)
    if n not in (1, None) or body.get("best_of") not in (None, 1):
        return False
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt) == 1
    return not body.get("echo")  # an echoed prompt would be echoed again by the continuation


def with_token_ids(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent upstream: asking for token ids, without any continuation field a client sent."""
    out = {**body, RETURN_TOKEN_IDS: True}
    out.pop(CONTINUATION_FIELD, None)
    return out


@dataclass(slots=True)
class StreamState:
    """What the router knows of one relayed single-choice stream."""

    endpoint_is_chat: bool
    client_wants_token_ids: bool
    prompt_token_ids: list[int] | None = None  # from the engine's first chunk (else the router's own)
    token_ids: list[int] = field(default_factory=list)  # generated so far, over every upstream
    text_chars: int = 0  # characters of text the client received
    finish_reason: str | None = None
    usage_sent: bool = False
    done: bool = False
    response_id: str | None = None  # the first upstream's, kept across the seam
    created: int | None = None
    migrations: int = 0
    model: str | None = None
    # Text reached the client without its token ids (a worker that does not return them): not resumable.
    untracked: bool = False
    # Tokens and prompt length at the start of the current upstream (its usage is rewritten to the whole request).
    seam_tokens: int = 0
    seam_prompt_tokens: int = 0
    _buffer: bytes = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take raw upstream bytes; return the complete events to send on, rewritten. Raises ``StreamFailed``
        on an upstream error event."""
        self._buffer += chunk
        out: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            event, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            rewritten = self._event(event.replace(b"\r\n", b"\n"))
            if rewritten is not None:
                out.append(rewritten)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return None
        if data == b"[DONE]":
            self.done = True
            return DONE
        try:
            chunk = orjson.loads(data)  # NOTE: orjson: the router parses every event of every stream it relays
        except ValueError:
            return event + b"\n\n"  # not ours to understand: passed through as it came
        if not isinstance(chunk, dict):
            return event + b"\n\n"
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            if error.get("type") == "server_error" or error.get("code") in ("engine_unavailable", "internal_error"):
                raise StreamFailed("error_event", str(error.get("message")))
            return event + b"\n\n"
        return self._chunk(chunk)

    def _chunk(self, chunk: dict[str, Any]) -> bytes | None:
        if self.response_id is None:
            self.response_id, self.created, self.model = chunk.get("id"), chunk.get("created"), chunk.get("model")
        elif self.migrations:
            chunk["id"], chunk["created"] = self.response_id, self.created
        prompt_ids = chunk.pop("prompt_token_ids", None)
        choices = chunk.get("choices") or []
        for choice in choices:
            prompt_ids = choice.pop("prompt_token_ids", None) or prompt_ids
            ids = choice.get("token_ids") if self.client_wants_token_ids else choice.pop("token_ids", None)
            if isinstance(ids, list):
                self.token_ids.extend(ids)
            text = self._choice_text(choice)
            self.text_chars += len(text)
            if text and not isinstance(ids, list):
                self.untracked = True
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        if prompt_ids is not None and not self.migrations:
            self.prompt_token_ids = list(prompt_ids)
            if self.client_wants_token_ids:
                chunk["prompt_token_ids"] = prompt_ids
        if isinstance(chunk.get("usage"), dict):
            self._rewrite_usage(chunk["usage"])
            if not choices:
                self.usage_sent = True
        if self.migrations and not choices and "usage" not in chunk:
            return None
        if self.migrations and choices and all(self._empty(c) for c in choices):
            return None  # the continuation's own role chunk: the client has had one
        return _event_bytes(chunk)

    def _choice_text(self, choice: dict[str, Any]) -> str:
        if self.endpoint_is_chat:
            delta = choice.get("delta") or {}
            if self.migrations:
                delta.pop("role", None)
            content = delta.get("content")
            return content if isinstance(content, str) else ""
        text = choice.get("text")
        return text if isinstance(text, str) else ""

    def _empty(self, choice: dict[str, Any]) -> bool:
        content = (choice.get("delta") or {}).get("content") if self.endpoint_is_chat else choice.get("text")
        return not content and choice.get("finish_reason") is None and not choice.get("logprobs") \
            and not (self.endpoint_is_chat and (choice.get("delta") or {}).get("tool_calls"))

    def _rewrite_usage(self, usage: dict[str, Any]) -> None:
        """The continuation counts earlier output as prompt: the client sees the whole request's usage."""
        if not self.migrations:
            return
        completion = self.seam_tokens + int(usage.get("completion_tokens") or 0)
        prompt = self.seam_prompt_tokens
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            details["cached_tokens"] = min(details["cached_tokens"], prompt)

    def chunk_base(self) -> dict[str, Any]:
        """The fields every chunk of this stream carries."""
        return {"id": self.response_id, "object": "chat.completion.chunk" if self.endpoint_is_chat else "text_completion",
                "created": self.created, "model": self.model}

    def finish_chunk(self, finish_reason: str) -> bytes:
        """The last choice chunk, for a stream whose upstream failed after its last token but before saying so."""
        self.finish_reason = finish_reason
        choice: dict[str, Any] = {"index": 0, "delta": {}} if self.endpoint_is_chat else {"index": 0, "text": ""}
        return _event_bytes({**self.chunk_base(), "choices": [{**choice, "logprobs": None,
                                                                "finish_reason": finish_reason}]})

    def begin_continuation(self) -> None:
        """A new upstream takes over: a half-received event from the failed one is dropped (never sent)."""
        self._buffer = b""
        self.migrations += 1
        self.seam_tokens = len(self.token_ids)
        self.seam_prompt_tokens = len(self.prompt_token_ids or ())


def continuation_body(body: dict[str, Any], state: StreamState) -> dict[str, Any] | None:
    """The request that resumes ``state`` on another worker, or None when nothing is left to generate."""
    generated = len(state.token_ids)
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    out[RETURN_TOKEN_IDS] = True
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(out.get(key), int):
            out[key] -= generated
            if out[key] < 1:
                return None
    if isinstance(out.get("min_tokens"), int):
        out["min_tokens"] = max(0, out["min_tokens"] - generated)
    out[CONTINUATION_FIELD] = {
        "prompt_token_ids": [*state.prompt_token_ids, *state.token_ids],
        "num_output_tokens": generated,
        "num_output_chars": state.text_chars,
    }
    return out


def _event_bytes(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def closing_events(state: StreamState, include_usage: bool) -> bytes:
    """End a stream whose request was already complete when its upstream failed (the finish chunk, or the
    last token, had arrived): the usage chunk the client asked for, then [DONE]."""
    out = b""
    if include_usage and not state.usage_sent and state.prompt_token_ids is not None:
        prompt, completion = len(state.prompt_token_ids), len(state.token_ids)
        out += _event_bytes({**state.chunk_base(), "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
    return out + DONE
