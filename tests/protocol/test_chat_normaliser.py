"""The one chat normaliser (tandem.protocol.chat): what the router hashes is what the engine caches."""

from __future__ import annotations

import json

import pytest

from tandem.protocol.chat import TemplateFeatures, chat_template_input, normalize_messages, validate_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_roles_parts_and_tool_calls_are_normalised():
    out = normalize_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "a\nb"}
    assert out[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert out[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("messages,field", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "x", "audio": {"id": "a"}}], "messages[0].audio"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ValueError) as info:
        normalize_messages(messages)
    assert str(info.value).startswith(field + ":")


@pytest.mark.parametrize("tools,field", [
    ({"x": 1}, "tools"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "tools[0].function.parameters"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
])
def test_bad_tools_name_the_field(tools, field):
    with pytest.raises(ValueError) as info:
        validate_tools(tools)
    assert str(info.value).startswith(field + ":")


def test_templates_without_tool_support_get_hermes_tools_in_the_system_message():
    plain = chat_template_input([{"role": "user", "content": "Weather in Oslo?"}], [WEATHER], TemplateFeatures())
    assert plain.tools is None and "tools" not in plain.template_kwargs()
    system = plain.messages[0]
    assert system["role"] == "system" and "<tools>" in system["content"] and "<tool_call>" in system["content"]
    assert json.dumps(WEATHER) in system["content"]
    # A template that renders tools itself gets them as ``tools=`` and the messages untouched.
    aware = chat_template_input([{"role": "user", "content": "Weather in Oslo?"}], [WEATHER],
                                TemplateFeatures(tools=True, tool_calls=True))
    assert aware.template_kwargs()["tools"] == [WEATHER] and aware.messages == [{"role": "user",
                                                                                  "content": "Weather in Oslo?"}]


def test_tool_turns_are_written_out_for_templates_without_tool_support():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = chat_template_input(messages, None, TemplateFeatures()).messages
    assert out[1] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'}
    assert out[2] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_tool_plans():
    from tandem.protocol.tools import HermesToolParser, make_parser, parse, plan_tools

    tools = validate_tools([WEATHER])
    default = plan_tools(tools, None)
    assert default == plan_tools(tools, "auto") and default.functions == ("get_weather",)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert parse(make_parser(default), "Sure. " + call)[1][0].name == "get_weather"
    assert plan_tools(None, None).mode == "none" and plan_tools(tools, "none").mode == "none"
    forced = plan_tools(tools, {"type": "function", "function": {"name": "get_weather"}})
    assert forced.mode == "forced" and forced.schema["properties"]["name"] == {"const": "get_weather"}
    # A call of an unknown function is text; the text held back at a chunk boundary comes out at the end.
    parser = HermesToolParser(("get_weather",))
    assert parse(parser, '<tool_call>{"name": "rm", "arguments": {}}</tool_call>')[1] == []
    parser = HermesToolParser(("get_weather",))
    assert "".join(e.text for e in parser.feed("abc <tool")) == "abc "
    events = parser.finish()
    assert "".join(e.text for e in events) == "<tool"


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_forced_calls_stream_name_then_arguments(step):
    from tandem.protocol.tools import ArgsDelta, CallEnd, CallStart, ForcedCallParser

    text = '{"name": "get_weather", "arguments": {"city": "Pa}ris", "n": {"x": 1}}}'
    parser, events = ForcedCallParser(("get_weather",)), []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    assert [e.name for e in events if isinstance(e, CallStart)] == ["get_weather"]
    assert json.loads("".join(e.text for e in events if isinstance(e, ArgsDelta))) == \
        {"city": "Pa}ris", "n": {"x": 1}}
    assert isinstance(events[-1], CallEnd)
    # Arguments written before the name: no stream head, the whole call at the end.
    parser = ForcedCallParser(("get_weather",))
    assert parser.feed('{"arguments": {}, "name": "get_weather"}') == []
    assert parser.finish()[0].name == "get_weather"
