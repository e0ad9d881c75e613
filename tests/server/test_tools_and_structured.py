"""Tool calling, structured output and logit_bias through `tandem serve` with the official openai client."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from server.conftest import API_KEY

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}}, "required": ["tz"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _check_call(call, tool):
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_and_required_tool_calls_are_grammar_constrained(client):
    named = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_time"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0], TIME)
    # required: some function, arguments valid for it, with sampling too (n=2).
    required = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                              temperature=1.0, seed=3, n=2, tool_choice="required")
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        _check_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def accumulate(chunks) -> list[dict]:
    """Streamed tool-call deltas put together as the openai client's users do: by index."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
            call["id"] = call["id"] or tc.id
            call["name"] = call["name"] or (tc.function.name if tc.function else None)
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
            call["pieces"] += 1
    return [calls[i] for i in sorted(calls)]


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                            tool_choice="required", stream=True)
    chunks = [c for c in stream if c.choices]
    whole = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                           tool_choice="required").choices[0].message.tool_calls[0]
    [call] = accumulate(chunks)
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    # The name first, then the arguments as they are generated (OpenAI's way), equal to the whole answer's.
    assert call["pieces"] > 2
    assert json.loads(call["arguments"]) == json.loads(whole.function.arguments)
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


def test_auto_parses_the_models_hermes_tool_calls(client):
    # The model's own output, steered by a choice constraint into the hermes format, is parsed as a call.
    for stream in (False, True):
        kwargs = dict(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, tool_choice="auto",
                      extra_body={"structured_outputs": {"choice": ["Let me check. " + HERMES]}})
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, calls, finish = choice.message.content, choice.message.tool_calls, choice.finish_reason
        assert text.strip() == "Let me check."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("get_weather", {"city": "Paris", "unit": "C"})]
        assert finish == "tool_calls"
    # Plain text stays plain text; tool_choice none never parses calls.
    plain = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60,
                                           temperature=0, tool_choice="none",
                                           extra_body={"structured_outputs": {"choice": [HERMES]}})
    assert plain.choices[0].message.content == HERMES and not plain.choices[0].message.tool_calls


def test_tool_results_in_later_turns_are_rendered(server, client):
    call = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                          tool_choice="required").choices[0].message
    turns = ASK + [call.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "18 C and sunny"}]
    answer = client.chat.completions.create(model="smol", messages=turns, tools=[WEATHER], max_tokens=20,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    rendered = httpx.post(f"{server.url}/tokenize", headers=AUTH,
                          json={"messages": turns, "tools": [WEATHER]}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", headers=AUTH, json={"tokens": rendered}).json()["prompt"]
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in text
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert answer.usage.prompt_tokens == len(rendered)


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_invalid_tools_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smol", messages=ASK, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param, info.value.body


def test_response_format_json_schema_and_errors(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}}, "required": ["capital"],
              "additionalProperties": False}
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Capital of France as JSON"}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema,
                                                                             "strict": True}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    for kwargs, param in (({"response_format": {"type": "json_schema", "json_schema": {"name": "c",
                                                                                    "schema": {"type": 5}}}},
                           "response_format"),
                          ({"extra_body": {"guided_regex": "("}}, "guided_regex"),
                          ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="smol", messages=ASK, max_tokens=4, **kwargs)
        assert info.value.body["param"] == param, info.value.body


def test_logit_bias(client):
    base = client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0)
    tokens = httpx.post(f"{client.base_url.scheme}://{client.base_url.host}:{client.base_url.port}/tokenize",
                        headers=AUTH, json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    forced = client.completions.create(model="smol", prompt="The sky is", max_tokens=3, temperature=0,
                                       logit_bias={str(tokens[0]): 100})
    assert forced.choices[0].text.startswith(" banana") and forced.choices[0].text != base.choices[0].text
    for bias in ({"49152": 5}, {"5": 101}, {"x": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="smol", prompt="hi", max_tokens=2, logit_bias=bias)
        assert info.value.body["param"] == "logit_bias", info.value.body
