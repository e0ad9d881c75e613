"""Anthropic Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``): request schemas and the
mapping onto the OpenAI chat request the engine and the router already understand.

The conversion is the contract: the router hashes the prompt of ``to_chat(request)`` and the engine renders the
same, through the one chat normaliser (``tandem.protocol.chat``).

Supported: ``system`` (string or text blocks), ``messages`` with text, ``tool_use`` and ``tool_result`` blocks,
``max_tokens``, ``stop_sequences``, ``temperature`` / ``top_p`` / ``top_k``, ``tools`` with ``tool_choice``
auto / any / tool / none, ``stream``, ``metadata.user_id``. Anything else is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from tandem.protocol.kv_transfer import KVTransferParams

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a caching hint; our prefix cache is automatic


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: StrictBool | None = None
    cache_control: dict[str, Any] | None = None


Block = TextBlock | ToolUseBlock | ToolResultBlock


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Metadata(_Strict):
    user_id: str | None = None


class MessagesRequest(_Strict):
    """``POST /v1/messages``."""

    model: str | None = None
    max_tokens: StrictInt = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: StrictInt | None = None
    stream: StrictBool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    # Disaggregated prefill/decode and request pairing (not Anthropic fields; the router sets them).
    kv_transfer_params: dict[str, Any] | None = None
    request_id: str | None = None

    def kv_params(self) -> KVTransferParams | None:
        return KVTransferParams.parse(self.kv_transfer_params)


class CountTokensRequest(_Strict):
    """``POST /v1/messages/count_tokens``: the prompt part of a messages request."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


def chat_messages(system: str | list[TextBlock] | None, messages: list[Message]) -> list[dict[str, Any]]:
    """Anthropic messages -> OpenAI chat messages (tool_use -> tool_calls, tool_result -> tool messages)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system)})
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts = [b.text for b in m.content if isinstance(b, TextBlock)]
        if m.role == "assistant":
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in m.content if isinstance(b, ToolUseBlock)]
            msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        # A user turn: tool results first (they answer the previous assistant turn), then its text.
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": ("Error: " if b.is_error else "") + _text(b.content)})
            elif isinstance(b, ToolUseBlock):
                raise ValueError("messages: tool_use blocks belong in assistant messages")
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def chat_tools(tools: list[Tool] | None, tool_choice: ToolChoice | None) -> tuple[list[dict] | None, Any]:
    """Anthropic tools and tool_choice -> OpenAI ``tools`` and ``tool_choice``."""
    if not tools:
        if tool_choice is not None and tool_choice.type in ("any", "tool"):
            raise ValueError("tool_choice: needs tools")
        return None, None
    openai_tools = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                      **({"description": t.description} if t.description else {})}}
                    for t in tools]
    if tool_choice is None or tool_choice.type == "auto":
        choice: Any = "auto"
    elif tool_choice.type == "none":
        choice = "none"
    elif tool_choice.type == "any":
        choice = "required"
    else:
        if not tool_choice.name:
            raise ValueError("tool_choice.name: required for type 'tool'")
        choice = {"type": "function", "function": {"name": tool_choice.name}}
    return openai_tools, choice


def to_chat(request: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat fields (messages, tools, tool_choice) of an Anthropic request."""
    tools, choice = chat_tools(request.tools, request.tool_choice)
    body: dict[str, Any] = {"messages": chat_messages(request.system, request.messages)}
    if tools:
        body["tools"] = tools
        body["tool_choice"] = choice
    return body


def from_raw(body: dict[str, Any]) -> dict[str, Any]:
    """The chat fields of a raw (router-side) Anthropic body; raises ValueError naming the field."""
    from pydantic import ValidationError

    from tandem.protocol.errors import from_validation_errors

    try:
        request = CountTokensRequest.model_validate({k: body.get(k) for k in ("messages", "system", "tools",
                                                                              "tool_choice") if k in body})
    except ValidationError as exc:
        raise ValueError(from_validation_errors(exc.errors()).message) from None
    return to_chat(request)


def stop_reason(finish_reason: str | None, stop_reason_value: Any) -> tuple[str, str | None]:
    """OpenAI-style finish reason -> Anthropic ``stop_reason`` and ``stop_sequence``."""
    if finish_reason == "stop" and isinstance(stop_reason_value, str):
        return "stop_sequence", stop_reason_value
    return STOP_REASONS.get(finish_reason or "stop", "end_turn"), None
