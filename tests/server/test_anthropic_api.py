"""The Anthropic Messages API on `tandem serve`, with the official anthropic client."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from server.conftest import API_KEY

pytestmark = pytest.mark.slow

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# NOTE: this anthropic client has no sampling keywords; temperature/top_p/top_k go through extra_body.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture
def aclient(server):
    with anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def test_text_message_matches_chat_completions(server, aclient, client):
    msg = aclient.messages.create(model="smol", max_tokens=16, **GREEDY, system="You are terse.",
                                  messages=[{"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}])
    chat = client.chat.completions.create(model="smol", max_tokens=16, **GREEDY, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    assert msg.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    # top_k 1 (and a tiny top_p) sample the greedy token whatever the temperature: they reach the sampler.
    for sampling in ({"temperature": 1.0, "top_k": 1}, {"temperature": 1.0, "top_p": 1e-6}):
        sampled = aclient.messages.create(model="smol", max_tokens=16, system="You are terse.", extra_body=sampling,
                                          messages=[{"role": "user", "content": "Name a fruit."}])
        assert sampled.content[0].text == msg.content[0].text
    count = aclient.messages.count_tokens(model="smol", system="You are terse.",
                                          messages=[{"role": "user", "content": "Name a fruit."}])
    assert count.input_tokens == msg.usage.input_tokens


def test_stop_sequences_and_streaming(aclient):
    full = aclient.messages.create(model="smol", max_tokens=24, **GREEDY, messages=ASK)
    text = full.content[0].text
    word = text.split()[2]
    stopped = aclient.messages.create(model="smol", max_tokens=24, **GREEDY, messages=ASK, stop_sequences=[word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text and text.startswith(stopped.content[0].text)
    with aclient.messages.stream(model="smol", max_tokens=24, **GREEDY, messages=ASK) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.output_tokens == full.usage.output_tokens
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(events)


def test_tool_use_forced_streamed_and_answered(aclient):
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        msg = aclient.messages.create(model="smol", max_tokens=60, **GREEDY, messages=ASK, tools=[WEATHER],
                                      tool_choice=choice)
        assert msg.stop_reason == "tool_use"
        use = [b for b in msg.content if b.type == "tool_use"]
        assert len(use) == 1 and use[0].name == "get_weather" and use[0].id.startswith("toolu_")
        jsonschema.validate(use[0].input, WEATHER["input_schema"])
    with aclient.messages.stream(model="smol", max_tokens=60, **GREEDY, messages=ASK, tools=[WEATHER],
                                 tool_choice={"type": "any"}) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        streamed = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].input == use[0].input
    # The tool's result in the next turn is rendered and answered.
    answer = aclient.messages.create(model="smol", max_tokens=16, **GREEDY, tools=[WEATHER], messages=ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use[0].id, "name": "get_weather",
                                           "input": use[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "18 C, sunny"}]}])
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    # tool_choice none: no tool_use blocks.
    none = aclient.messages.create(model="smol", max_tokens=16, **GREEDY, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "none"})
    assert all(b.type == "text" for b in none.content)


def test_errors_are_anthropic_shaped(server, aclient):
    with anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model="smol", max_tokens=4, messages=ASK)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"
    cases = [
        (dict(max_tokens=4, messages=[]), "messages"),
        (dict(max_tokens=0, messages=ASK), "max_tokens"),
        (dict(max_tokens=4, messages=ASK, extra_body={"temperature": 1.5}), "temperature"),
        (dict(max_tokens=4, messages=ASK, extra_body={"top_k": "many"}), "top_k"),
        (dict(max_tokens=4, messages=ASK, tool_choice={"type": "any"}), "tool_choice"),
        (dict(max_tokens=4, messages=ASK, tools=[{**WEATHER, "input_schema": {"type": "objekt"}}]), "tools"),
        (dict(max_tokens=4, messages=ASK, tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}),
         "tool_choice"),
        (dict(max_tokens=4, messages=ASK, extra_body={"thinking": {"type": "enabled", "budget_tokens": 10}}),
         "thinking"),
        (dict(max_tokens=4, messages=[{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AA=="}}]}]), "messages"),
    ]
    for kwargs, field in cases:
        with pytest.raises(anthropic.BadRequestError) as info:
            aclient.messages.create(model="smol", **kwargs)
        body = info.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        assert field in body["error"]["message"], (field, body)
    with pytest.raises(anthropic.NotFoundError) as info:
        aclient.messages.create(model="claude-nope", max_tokens=4, messages=ASK)
    assert info.value.body["error"]["type"] == "not_found_error"
    # x-api-key and Bearer both authenticate.
    for headers in ({"x-api-key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        r = httpx.post(f"{server.url}/v1/messages/count_tokens", headers=headers, json={"messages": ASK})
        assert r.status_code == 200 and r.json()["input_tokens"] > 0
