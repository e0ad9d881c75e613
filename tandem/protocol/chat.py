"""The one chat normaliser: OpenAI chat messages and tools -> the chat template's input.

The router hashes the prompt it renders from this and the engine caches the prompt it renders from this, so
both must produce the same text: they both call ``chat_template_input`` (written twice, the two drifted and
prefix routing missed silently).

Choices (as vLLM does for text models):
- text content parts are joined with ``"\\n"``; other part types are rejected (``messages[i].content``);
- the ``developer`` role becomes ``system``;
- an assistant message's ``tool_calls`` keep their ``function.arguments`` as a parsed object (templates
  ``tojson`` them);
- templates that know nothing of tools (no ``tools`` in their source, e.g. SmolLM2's) get the tools described
  in the system message in the hermes format (``<tools>...</tools>``, answers in ``<tool_call>{json}</tool_call>``),
  assistant tool calls written as ``<tool_call>`` blocks and tool results as ``<tool_response>`` user turns,
  the way Qwen2.5's template renders them.

Errors are ValueErrors whose message starts with the offending field (``messages[1].content: ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}
_TOOL_KEYS = {"type", "function"}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_DEFAULT_SYSTEM = "You are a helpful assistant."
_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>"
)


@dataclass(slots=True)
class TemplateInput:
    """What ``apply_chat_template`` gets: the conversation, and ``tools`` when the template renders them."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the template (``tools`` only when given)."""
        return {**self.kwargs, **({"tools": self.tools} if self.tools else {})}


@dataclass(frozen=True, slots=True)
class TemplateFeatures:
    """What a chat template renders by itself (read from its source)."""

    tools: bool = False
    tool_calls: bool = False

    @classmethod
    def of(cls, template: str | None) -> "TemplateFeatures":
        """Features of the jinja source ``template`` (None: no template)."""
        if not template:
            return cls()
        return cls(tools="tools" in template, tool_calls="tool_calls" in template)


def content_text(content: Any, where: str) -> str | None:
    """A message's content as text: a string, None, or a list of text parts joined with newlines."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"{where}[{j}]: must be a content part object")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"{where}[{j}]: content parts of type {kind!r} are not supported (text only)")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}[{j}].text: must be a string")
        texts.append(text)
    return "\n".join(texts)


def validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Check OpenAI ``tools`` (function tools with a JSON-schema ``parameters``); returns them normalised."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError("tools: must be a list of tool objects")
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    out = []
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ValueError(f"{where}: must be {{'type': 'function', 'function': {{...}}}}")
        extra = set(tool) - _TOOL_KEYS
        if extra:
            raise ValueError(f"{where}.{sorted(extra)[0]}: is not supported")
        fn = tool["function"]
        extra = set(fn) - _FUNCTION_KEYS
        if extra:
            raise ValueError(f"{where}.function.{sorted(extra)[0]}: is not supported")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name: must be a non-empty string")
        if name in names:
            raise ValueError(f"{where}.function.name: {name!r} is defined twice")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str | None):
            raise ValueError(f"{where}.function.description: must be a string")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
            try:
                validator_for(params).check_schema(params)
            except SchemaError as exc:
                raise ValueError(f"{where}.function.parameters: not a valid JSON schema: {exc.message}") from None
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ValueError(f"{where}: must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}[{j}].function: must have a name and arguments")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise ValueError(f"{where}[{j}].function.arguments: not valid JSON") from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI chat ``messages`` and bring them to the template's form (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of message objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: must be a message object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}")
        extra = [k for k in m if k not in _MESSAGE_KEYS and m[k] is not None]
        if extra:
            raise ValueError(f"{where}.{extra[0]}: is not supported")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": content_text(m.get("content"), f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ValueError(f"{where}.name: must be a string")
            msg["name"] = m["name"]
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise ValueError(f"{where}.tool_calls: only assistant messages carry tool calls")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ValueError(f"{where}.tool_call_id: a tool message needs the id of the call it answers")
            msg["tool_call_id"] = m["tool_call_id"]
        if msg["content"] is None and "tool_calls" not in msg:
            if role != "assistant":
                raise ValueError(f"{where}.content: is required")
            msg["content"] = ""
        out.append(msg)
    return out


def _hermes_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}) + "\n</tool_call>"


def _inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  features: TemplateFeatures) -> list[dict[str, Any]]:
    """For templates without tool support: tools, tool calls and tool results written into the messages."""
    out = []
    for m in messages:
        if "tool_calls" in m and not features.tool_calls:
            text = "\n".join(filter(None, [m["content"] or "", *(_hermes_call(c) for c in m["tool_calls"])]))
            m = {"role": "assistant", "content": text}
        elif m["role"] == "tool" and not features.tool_calls:
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not features.tools:
        described = "".join("\n" + json.dumps(t, sort_keys=False) for t in tools)
        block = _TOOLS_PREAMBLE + described + _TOOLS_POSTAMBLE
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": f"{_DEFAULT_SYSTEM}\n\n{block}"})
    return out


def chat_template_input(messages: Any, tools: Any = None, features: TemplateFeatures = TemplateFeatures(),
                        chat_template_kwargs: Any = None) -> TemplateInput:
    """Messages, tools and extra template variables -> the template's input (raises ValueError naming the field)."""
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise ValueError("chat_template_kwargs: must be an object")
    normal = normalize_messages(messages)
    valid_tools = validate_tools(tools)
    conversation = _inline_tools(normal, valid_tools, features)
    return TemplateInput(conversation, valid_tools if features.tools else None, dict(chat_template_kwargs or {}))
