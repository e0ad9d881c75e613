"""End to end, disaggregated: the router in front of a real `tandem prefill` + `tandem decode` pair gives the same
greedy outputs as `tandem serve`, decides when the prefill hop pays, and falls back when prefill dies."""

from __future__ import annotations

import importlib.util
import signal

import httpx
import openai
import pytest

from .peers import free_port
from .test_e2e import MODEL, TENANTS, Proc, router_metric, stop_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tandem.worker.prefill") is None
                       or importlib.util.find_spec("tandem.worker.decode") is None,
                       reason="needs `tandem prefill` and `tandem decode`"),
]

ENGINE_ARGS = ["--model", MODEL, "--kv-cache-memory", "128MB", "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    procs: list[Proc] = []
    urls = {}
    try:
        for role in ("prefill", "decode", "serve"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            extra = ["--kv-port", str(free_port())] if role != "serve" else []
            procs.append(Proc([role, "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url, *ENGINE_ARGS,
                               *extra], tmp / f"{role}.log").start())
            urls[role] = url
        for proc, url in zip(procs, urls.values()):
            proc.wait_healthy(url)
        port = free_port()
        urls["router"] = f"http://127.0.0.1:{port}"
        router = Proc(["router", "--port", str(port), "--model", MODEL, "--prefill", urls["prefill"], "--decode",
                       urls["decode"], "--disagg-threshold", "48", "--health-interval", "0.5"], tmp / "router.log").start()
        procs.append(router)
        router.wait_healthy(urls["router"], 60)
        yield urls, procs, tmp
    finally:
        stop_all(procs)


def complete(url: str, prompt: str, stream: bool = False) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text


def chat(url: str, system: str, question: str, stream: bool = False) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices)
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                              temperature=0).choices[0].message.content


def test_disaggregated_outputs_equal_serve(pd):
    urls, _, tmp = pd
    for stream, animal, tenant in ((False, "fox", 1), (True, "owl", 2)):
        long_prompt = f"Here is a long story about a {animal} who lived in a forest near a river. " * 6 + f"The {animal}"
        assert complete(urls["router"], long_prompt, stream) == complete(urls["serve"], long_prompt)
        assert chat(urls["router"], TENANTS[tenant], "What should I do today?", stream) == \
            chat(urls["serve"], TENANTS[tenant], "What should I do today?")
    assert router_metric(urls["router"], "tandem:router_decisions_total", decision="disaggregated") == 4
    assert router_metric(urls["router"], "tandem:router_requests_total", pool="prefill", outcome="ok") == 4
    # A short prompt skips the prefill hop.
    assert complete(urls["router"], "Hi there") == complete(urls["serve"], "Hi there")
    assert router_metric(urls["router"], "tandem:router_decisions_total", decision="direct") == 1
    # So does a long prompt the decode worker already holds (it pulled those blocks; its KV events say so).
    assert chat(urls["router"], TENANTS[1], "What should I do today?") == \
        chat(urls["serve"], TENANTS[1], "What should I do today?")
    assert router_metric(urls["router"], "tandem:router_decisions_total", decision="direct") == 2


def test_min_tokens_and_seeded_sampling_through_prefill_and_decode(pd):
    """The prefill hop runs with max_tokens 1 (and min_tokens capped at 1); the decode worker continues from the
    prefill's first token, so min_tokens and a seeded random stream come out as ``tandem serve`` gives them."""
    urls, _, _ = pd
    before = router_metric(urls["router"], "tandem:router_decisions_total", decision="disaggregated")
    with openai.OpenAI(base_url=urls["router"] + "/v1", api_key="none", max_retries=0, timeout=120) as routed, \
            openai.OpenAI(base_url=urls["serve"] + "/v1", api_key="none", max_retries=0, timeout=120) as direct:
        # Two new prompts: neither worker holds them, so both take the prefill hop.
        for topic, extra in (("planets", {"temperature": 0, "extra_body": {"min_tokens": 6}}),
                             ("rivers", {"temperature": 0.8, "seed": 11})):
            prompt = f"A list of the {topic} everyone should know, with one fact about each of them, in order. " * 3
            got = routed.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **extra)
            want = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **extra)
            assert got.choices[0].text == want.choices[0].text
            assert got.usage.completion_tokens == want.usage.completion_tokens
            if "extra_body" in extra:
                assert got.usage.completion_tokens >= 6
    assert router_metric(urls["router"], "tandem:router_decisions_total", decision="disaggregated") == before + 2


def test_prefill_failure_falls_back_to_decode_alone(pd):
    urls, procs, _ = pd
    prefill = procs[0]
    long_prompt = "A recipe for bread: flour, water, salt and yeast, mixed and kneaded for ten minutes. " * 5 + "Then"
    expected = complete(urls["serve"], long_prompt)
    prefill.kill(signal.SIGKILL)
    assert complete(urls["router"], long_prompt) == expected
    # Killed while seen healthy, or already found dead by a health check: either way decode serves alone.
    fallbacks = router_metric(urls["router"], "tandem:router_decisions_total", decision="prefill_fallback")
    directs = router_metric(urls["router"], "tandem:router_decisions_total", decision="direct")
    assert fallbacks + directs == 3
    assert httpx.get(urls["router"] + "/health").status_code == 200
