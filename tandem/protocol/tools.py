"""Tool calling at the API edge: which calls a request allows, the grammar that forces them, and the parsers
that find calls in what a model wrote.

- ``tool_choice`` ``none`` / ``auto`` / ``required`` / a named function -> a ``ToolPlan``. ``required`` and a
  named function are grammar-constrained: the completion must be one JSON object ``{"name": <fn>, "arguments":
  <fn.parameters>}`` (``anyOf`` over the functions for ``required``), so its arguments always validate.
- ``auto``: the model's own format is parsed by a parser from ``TOOL_PARSERS``; ``hermes`` (``<tool_call>{json}
  </tool_call>``, SmolLM2's and Qwen's) is the default.

Parsers work incrementally (``feed`` each new piece of text, then ``finish``) so streams can send text as it
comes and a tool call once it is complete; ``parse`` runs one over a whole text.

Torch-free and server-free: errors are ValueErrors naming the field (``tool_choice: ...``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

ToolMode = Literal["none", "auto", "forced"]
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request lets the model do with its tools."""

    mode: ToolMode
    functions: tuple[str, ...] = ()  # the functions a forced call may name
    schema: dict[str, Any] | None = None  # the JSON schema a forced call's output must match


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One tool call found in the output: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class TextPiece:
    """Plain text of the output, outside any tool call."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A streamed call begins: its function's name is known, its arguments follow as ``ArgsDelta`` pieces."""

    name: str


@dataclass(frozen=True, slots=True)
class ArgsDelta:
    """The next piece of a streamed call's arguments (JSON text)."""

    text: str


@dataclass(frozen=True, slots=True)
class CallEnd:
    """The streamed call's arguments are complete."""


Event = TextPiece | ParsedCall | CallStart | ArgsDelta | CallEnd
# The head of a forced call, up to where its arguments object begins (the grammar writes "name" first).
_FORCED_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"[\s}]*\Z")


def call_schema(tools: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON schema of one call of any function in ``names``."""
    options = []
    for tool in tools:
        fn = tool["function"]
        if fn["name"] not in names:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> ToolPlan:
    """The ``ToolPlan`` for validated ``tools`` and a ``tool_choice`` (raises ValueError naming tool_choice)."""
    if tool_choice == "none" or tool_choice is None and not tools:
        return ToolPlan("none")
    if not tools:
        raise ValueError("tool_choice: needs tools")
    names = tuple(t["function"]["name"] for t in tools)
    if tool_choice in ("auto", None):  # auto is the default when tools are given
        return ToolPlan("auto", names)
    if tool_choice == "required":
        return ToolPlan("forced", names, call_schema(tools, names))
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise ValueError("tool_choice: must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if fn["name"] not in names:
        raise ValueError(f"tool_choice: function {fn['name']!r} is not among the tools ({', '.join(names)})")
    return ToolPlan("forced", (fn["name"],), call_schema(tools, (fn["name"],)))


def _call_from_json(text: str, allowed: tuple[str, ...] | None) -> ParsedCall | None:
    """``{"name": ..., "arguments": {...}}`` -> a call (None if it is not one)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if allowed is not None and obj["name"] not in allowed:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass(slots=True)
class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among text (hermes, Qwen, SmolLM2).

    NOTE: text that might be the start of ``<tool_call>`` is held back until it is known not to be; a block whose
    JSON is not a call of a known function is given back as text, so nothing the model wrote is lost.
    """

    allowed: tuple[str, ...] | None = None
    _buffer: str = ""
    _in_call: bool = False

    def feed(self, text: str) -> list[Event]:
        """Events for the output so far, given its next piece ``text``."""
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return events
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                call = _call_from_json(body.strip(), self.allowed)
                events.append(call if call is not None else TextPiece(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE))
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                if start:
                    events.append(TextPiece(self._buffer[:start]))
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
            ready = self._buffer[:len(self._buffer) - keep]
            if ready:
                events.append(TextPiece(ready))
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return events

    def finish(self) -> list[Event]:
        """Events for what is still held back once the output has ended (an unclosed call is text)."""
        in_call, rest = self._in_call, self._buffer
        self._buffer, self._in_call = "", False
        if in_call:
            call = _call_from_json(rest.strip(), self.allowed)
            if call is not None:  # the output stopped (EOS) right after the JSON, before </tool_call>
                return [call]
            return [TextPiece(TOOL_CALL_OPEN + rest)]
        return [TextPiece(rest)] if rest else []


@dataclass(slots=True)
class ForcedCallParser:
    """A grammar-forced call: the whole output is one ``{"name", "arguments"}`` JSON object.

    Streamed as OpenAI streams calls: ``CallStart`` once the name is written, then the arguments as they are
    generated (``ArgsDelta``), then ``CallEnd``. NOTE: a run of closing braces and whitespace is held back until
    more text comes or the output ends, since the last brace closes the call object, not the arguments.
    """

    allowed: tuple[str, ...] | None = None
    _buffer: str = ""
    _started: bool = False

    def feed(self, text: str) -> list[Event]:
        """Events for the output so far, given its next piece ``text``."""
        self._buffer += text
        events: list[Event] = []
        if not self._started:
            head = _FORCED_HEAD.match(self._buffer)
            if head is None:
                return events
            self._started = True
            events.append(CallStart(json.loads(head.group(1))))
            self._buffer = self._buffer[head.end():]
        held = _TAIL.search(self._buffer).start()
        if held:
            events.append(ArgsDelta(self._buffer[:held]))
            self._buffer = self._buffer[held:]
        return events

    def finish(self) -> list[Event]:
        """The rest: the call's last arguments and its end; without a call head, the whole call or the raw text
        (when the output was cut short, by ``max_tokens``, before the JSON ended)."""
        rest, self._buffer = self._buffer, ""
        if self._started:
            self._started = False
            closing = rest.rstrip()
            args = closing[:-1] if closing.endswith("}") else closing  # the call object's own closing brace
            return ([ArgsDelta(args)] if args else []) + [CallEnd()]
        call = _call_from_json(rest, self.allowed)
        return [call] if call is not None else ([TextPiece(rest)] if rest else [])

    def whole(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """A whole output -> (its text, or None; the call)."""
        call = _call_from_json(text, self.allowed)
        return (None, [call]) if call is not None else (text, [])


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


TOOL_PARSERS = {"hermes": HermesToolParser}


def make_parser(plan: ToolPlan, name: str = "hermes") -> HermesToolParser | ForcedCallParser | None:
    """The parser for a request's output (None when tools are off)."""
    if plan.mode == "none":
        return None
    if plan.mode == "forced":
        return ForcedCallParser(plan.functions)
    return TOOL_PARSERS[name](plan.functions)


def parse(parser: HermesToolParser | ForcedCallParser, text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole output -> (its text outside tool calls, or None when empty; the calls)."""
    if isinstance(parser, ForcedCallParser):
        return parser.whole(text)
    events = parser.feed(text) + parser.finish()
    calls = [e for e in events if isinstance(e, ParsedCall)]
    content = "".join(e.text for e in events if isinstance(e, TextPiece))
    if calls:
        content = content.strip()
    return (content or None) if calls else content, calls
