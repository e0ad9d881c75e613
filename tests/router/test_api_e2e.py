"""The whole API through the router in front of real prefill/decode workers, with the official openai and
anthropic clients: tools, structured output, logit_bias, the Messages API, tokenize/detokenize, bad inputs; and
the parity of the router's prompt (block hashes) with the engines' (from their KV events)."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tandem.protocol.hashing import hash_block_tokens
from tandem.router.tokenizer import PromptTokenizer

from server.test_tools_and_structured import accumulate

from .peers import free_port
from .test_e2e import MODEL, Proc, engine_counters, router_metric, stop_all

pytestmark = pytest.mark.slow

KEY = "router-test-key"
# NOTE: the key guards the router; the workers are open (the router's health checks read their /v1/models unkeyed).
ENGINE_ARGS = ["--model", MODEL, "--kv-cache-memory", "128MB", "--max-model-len", "1024"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    """Two prefill workers, one decode worker and a router (every prompt of 2+ new tokens takes the prefill hop)."""
    tmp = tmp_path_factory.mktemp("api")
    procs: list[Proc] = []
    urls: dict[str, str] = {}
    try:
        for name in ("prefill", "prefill2", "decode"):
            port = free_port()
            url = urls[name] = f"http://127.0.0.1:{port}"
            procs.append(Proc([name.rstrip("2"), "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url,
                               "--kv-port", str(free_port()), *ENGINE_ARGS], tmp / f"{name}.log").start())
        for proc, url in zip(procs, urls.values()):
            proc.wait_healthy(url)
        port = free_port()
        urls["router"] = f"http://127.0.0.1:{port}"
        router = Proc(["router", "--port", str(port), "--model", MODEL, "--api-key", KEY, "--prefill", urls["prefill"],
                       "--prefill", urls["prefill2"], "--decode", urls["decode"], "--disagg-threshold", "2",
                       "--health-interval", "0.5"], tmp / "router.log").start()
        procs.append(router)
        router.wait_healthy(urls["router"], 60)
        yield urls
    finally:
        stop_all(procs)


@pytest.fixture(scope="module")
def oai(pd):
    with openai.OpenAI(base_url=pd["router"] + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def claude(pd):
    with anthropic.Anthropic(base_url=pd["router"], api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def test_tools_structured_output_and_logit_bias_through_pd(pd, oai):
    before = router_metric(pd["router"], "tandem:router_decisions_total", decision="disaggregated")
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0)
        if stream:
            chunks = [c for c in oai.chat.completions.create(stream=True, **kwargs) if c.choices]
            calls = [(c["name"], c["arguments"]) for c in accumulate(chunks)]
            finish = chunks[-1].choices[0].finish_reason
        else:
            choice = oai.chat.completions.create(**kwargs).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
            finish = choice.finish_reason
        assert finish == "tool_calls" and calls[0][0] == "get_weather"
        jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    # auto: the model's hermes output (steered by a choice constraint) is parsed into a call, streamed too.
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    chunks = [c for c in oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0, stream=True,
        extra_body={"structured_outputs": {"choice": [hermes]}}) if c.choices]
    assert [(c["name"], json.loads(c["arguments"])) for c in accumulate(chunks)] == [("get_weather", {"city": "Oslo"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    resp = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2? Answer in JSON."}],
                                       max_tokens=20, temperature=0, response_format={
                                           "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    ids = httpx.post(pd["router"] + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                     json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    biased = oai.completions.create(model=MODEL, prompt="The sky is blue and the grass is green. " * 2 + "My fruit:",
                                    max_tokens=2, temperature=0, logit_bias={str(ids[0]): 100})
    assert biased.choices[0].text.startswith(" banana")
    # Every request above took the prefill hop: the prefill's first token obeyed the grammar / the bias too.
    assert router_metric(pd["router"], "tandem:router_decisions_total", decision="disaggregated") - before >= 3


def test_bad_inputs_through_the_router(pd, oai):
    cases = [
        (dict(messages=ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),
        (dict(messages=ASK, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                 "schema": {"type": 7}}}),
         "response_format"),
        (dict(messages=ASK, extra_body={"audio": {"voice": "x"}}), "audio"),
        (dict(messages=ASK, extra_body={"logit_bias": {"999999": 1}}), "logit_bias"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
        assert info.value.body["param"] == param, info.value.body


def test_messages_api_through_the_router(pd, claude):
    direct = anthropic.Anthropic(base_url=pd["decode"], api_key=KEY, max_retries=0, timeout=120)
    question = [{"role": "user", "content": "Tell me about the tallest mountains on Earth, in one sentence."}]
    via_router = claude.messages.create(model=MODEL, max_tokens=16, system="You are a geography teacher.",
                                        messages=question, **GREEDY)
    alone = direct.messages.create(model=MODEL, max_tokens=16, system="You are a geography teacher.",
                                   messages=question, **GREEDY)
    assert via_router.content[0].text == alone.content[0].text
    assert (via_router.usage.input_tokens, via_router.usage.output_tokens) == \
        (alone.usage.input_tokens, alone.usage.output_tokens)
    with claude.messages.stream(model=MODEL, max_tokens=16, system="You are a geography teacher.",
                                messages=question, **GREEDY) as stream:
        assert stream.get_final_message().content[0].text == alone.content[0].text
    tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]
    msg = claude.messages.create(model=MODEL, max_tokens=60, messages=ASK, tools=tools, tool_choice={"type": "any"},
                                 **GREEDY)
    assert msg.stop_reason == "tool_use" and msg.content[-1].name == "get_weather"
    with claude.messages.stream(model=MODEL, max_tokens=60, messages=ASK, tools=tools,
                                tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert "input_json_delta" in deltas and streamed.content[-1].input == msg.content[-1].input
    count = claude.messages.count_tokens(model=MODEL, messages=ASK, tools=tools)
    assert count.input_tokens == direct.messages.count_tokens(model=MODEL, messages=ASK, tools=tools).input_tokens
    direct.close()
    # Errors answered by the router itself and by the worker behind it are in Anthropic's shape.
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="other", max_tokens=4, messages=ASK)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=4, messages=ASK, extra_body={"thinking": {"type": "enabled"}})
    assert info.value.body["type"] == "error" and "thinking" in info.value.body["error"]["message"]
    with anthropic.Anthropic(base_url=pd["router"], api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model=MODEL, max_tokens=4, messages=ASK)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_tokenize_and_detokenize_through_the_router(pd):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        for path, body in (("/tokenize", {"prompt": "Hello there"}), ("/tokenize", {"messages": ASK}),
                           ("/detokenize", {"tokens": [1, 2, 3, 4]})):
            via_router = httpx.post(pd["router"] + path, headers=headers, json=body)
            assert via_router.status_code == 200 and via_router.json() == \
                httpx.post(pd["decode"] + path, headers=headers, json=body).json()
    assert httpx.post(pd["router"] + "/tokenize", json={"prompt": "x"}).status_code == 401
    bad = httpx.post(pd["router"] + "/detokenize", headers={"x-api-key": KEY}, json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _snapshot(url: str) -> tuple[int, set[int]]:
    """A worker's KV-event snapshot: its block size and the hashes of the blocks it caches."""
    with httpx.stream("GET", url + "/kv_events/stream", timeout=10) as r:
        first = json.loads(next(r.iter_lines()))
    return first["block_size"], set(first["block_hashes"])


def test_router_and_engine_agree_on_chat_prompts(pd, oai, tokenizer_path):
    """Content parts, the developer role and tools: the router's prompt ids and block hashes are the engine's,
    and the second request of a tenant goes to the prefill worker that cached the first."""
    system = "You are the support desk of a bicycle shop. Answer about repairs, parts and opening hours. " * 3

    def conversation(question: str) -> list[dict]:
        return [{"role": "developer", "content": [{"type": "text", "text": system}, {"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": question}, {"type": "text", "text": "Thanks!"}]}]

    first = conversation("Do you fix flat tyres?")
    router_ids = PromptTokenizer(tokenizer_path).encode_chat_request(first, [WEATHER])
    engine_ids = httpx.post(pd["decode"] + "/tokenize", headers={"x-api-key": KEY},
                            json={"messages": first, "tools": [WEATHER]}).json()["tokens"]
    assert router_ids == engine_ids
    prefills = [pd["prefill"], pd["prefill2"]]
    hits_before = [engine_counters(u)[0] for u in prefills]
    oai.chat.completions.create(model=MODEL, messages=first, tools=[WEATHER], max_tokens=2, temperature=0)
    block_size = _snapshot(prefills[0])[0]
    router_hashes = hash_block_tokens(router_ids, block_size)
    owner = [i for i, u in enumerate(prefills) if set(router_hashes) <= _snapshot(u)[1]]
    assert len(owner) == 1, "exactly one prefill worker caches the prompt's blocks, with the router's hashes"
    # The router learns the blocks from the engine's KV events, then sends the tenant's next question there.
    deadline = time.monotonic() + 10
    while router_metric(pd["router"], "tandem:router_index_blocks") < len(router_hashes):
        assert time.monotonic() < deadline, "the router's index never received the prefill worker's blocks"
        time.sleep(0.2)
    oai.chat.completions.create(model=MODEL, messages=conversation("Are you open on Sunday?"), tools=[WEATHER],
                                max_tokens=2, temperature=0)
    hits = [engine_counters(u)[0] - b for u, b in zip(prefills, hits_before)]
    assert hits[owner[0]] >= len(router_ids) // 2 and hits[1 - owner[0]] == 0, hits
