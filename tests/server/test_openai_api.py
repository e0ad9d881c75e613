"""`tandem serve` driven over real HTTP with the official openai client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tandem import SamplingParams

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Give me two facts about the Moon."}]
PROMPT = "The three primary colours are"


def greedy_reference(llm, prompt=None, messages=None, max_tokens=16):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    out = llm.chat(messages, params) if messages else llm.generate(prompt, params)
    return out[0].outputs[0]


def test_completion_matches_offline_engine(client, reference_llm):
    ref = greedy_reference(reference_llm, PROMPT)
    resp = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0)
    assert resp.choices[0].text == ref.text
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.prompt_tokens == len(reference_llm.engine.tokenize(PROMPT))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_completion_matches(client, reference_llm):
    ref = greedy_reference(reference_llm, PROMPT)
    stream = client.completions.create(model="smol", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_streamed_and_not_match(client, reference_llm):
    ref = greedy_reference(reference_llm, messages=CHAT, max_tokens=24)
    resp = client.chat.completions.create(model="smol", messages=CHAT, max_completion_tokens=24, temperature=0)
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_token_id_prompts_and_lists_of_prompts(client, reference_llm):
    ids = reference_llm.engine.tokenize(PROMPT)
    by_ids = client.completions.create(model="smol", prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="smol", prompt=[PROMPT, "One, two, three,"], max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == by_text.choices[0].text
    echo = client.completions.create(model="smol", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + by_text.choices[0].text


def test_n_samples_and_seed_reproducibility(client):
    kwargs = dict(model="smol", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert len(a.choices) == 3
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # samples differ from each other
    c = client.completions.create(**{**kwargs, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_strings_cut_the_output(client):
    full = client.completions.create(model="smol", prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.completions.create(model="smol", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="smol", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_logprobs(client):
    resp = client.completions.create(model="smol", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_extra_body_parameters_are_honoured(client):
    greedy = client.completions.create(model="smol", prompt=PROMPT, max_tokens=10, temperature=0)
    top1 = client.completions.create(model="smol", prompt=PROMPT, max_tokens=10, temperature=1.0,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    forced = client.completions.create(model="smol", prompt="Hi", max_tokens=20, temperature=0,
                                       extra_body={"min_tokens": 20, "ignore_eos": True})
    assert forced.usage.completion_tokens == 20
    penalised = client.completions.create(model="smol", prompt=PROMPT, max_tokens=24, temperature=0,
                                          extra_body={"repetition_penalty": 1.8, "min_p": 0.05})
    # A strong repetition penalty steers away from the greedy continuation of a list prompt.
    assert penalised.choices[0].text != greedy.choices[0].text
    # A field nobody defines is refused, not ignored.
    with pytest.raises(openai.BadRequestError, match="unknown_field"):
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=2, extra_body={"unknown_field": 1})


def test_request_id_is_honoured(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer test-secret-key", "X-Request-Id": "my-id-42"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-id-42"
    assert r.json()["id"] == "cmpl-my-id-42"


def test_models_tokenize_detokenize_version(server, client, reference_llm):
    assert [m.id for m in client.models.list().data] == ["smol"]
    h = {"Authorization": "Bearer test-secret-key"}
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, headers=h).json()
    assert tok["tokens"] == reference_llm.engine.tokenize(PROMPT) and tok["count"] == len(tok["tokens"])
    detok = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()
    assert detok["prompt"] == PROMPT
    assert httpx.get(f"{server.url}/version").json()["version"]


async def test_async_client_concurrent(aclient, reference_llm):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(6)]
    refs = [greedy_reference(reference_llm, p, max_tokens=10).text for p in prompts]
    resps = await asyncio.gather(*[
        aclient.completions.create(model="smol", prompt=p, max_tokens=10, temperature=0) for p in prompts])
    assert [r.choices[0].text for r in resps] == refs
    stream = await aclient.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=0,
                                                   stream=True)
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == greedy_reference(reference_llm, messages=CHAT, max_tokens=8).text


async def test_fifty_concurrent_requests_each_match_their_single_output(aclient):
    prompts = [f"Write the number {i} in words:" for i in range(50)]
    single = []
    for p in prompts:  # one at a time first
        r = await aclient.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0)
        single.append(r.choices[0].text)
    together = await asyncio.gather(*[
        aclient.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0) for p in prompts])
    assert [r.choices[0].text for r in together] == single
