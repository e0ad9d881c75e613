"""Mid-stream migration with real engines: SIGKILL the busiest worker while 8 greedy streams run; every stream
completes with the text and usage of an uninterrupted run (float32), aggregated and disaggregated. Also the
engine side of the contract on its own: a continuation resumes across the seam exactly (stop strings, held-back
text, penalties, seeded sampling).

Slow: real model, real processes (module-scoped, float32, one thread each).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from .peers import free_port
from .test_e2e import MODEL, TENANTS, Proc, router_metric, stop_all

pytestmark = pytest.mark.slow

ENGINE_ARGS = ["--model", MODEL, "--dtype", "float32", "--threads", "1", "--kv-cache-memory", "128MB",
               "--max-model-len", "1024"]
ROUTER_ARGS = ["--model", MODEL, "--health-interval", "0.5", "--outlier-base-ejection", "1"]
MAX_TOKENS = 40


def start_engine(role: str, tmp, name: str) -> tuple[str, Proc]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--kv-port", str(free_port())] if role in ("prefill", "decode") else []
    return url, Proc([role, "--host", "127.0.0.1", "--port", str(port), "--advertise-url", url, *ENGINE_ARGS, *extra],
                     tmp / f"{name}.log").start()


def start_router(tmp, *workers: str) -> tuple[str, Proc]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return url, Proc(["router", "--port", str(port), *ROUTER_ARGS, *workers], tmp / "router.log").start()


def requests_for(kind: str) -> list[tuple[str, dict[str, Any]]]:
    """8 greedy streams: chat and completions, all asking for usage; long prompts (P/D uses the prefill hop)."""
    out = []
    for i in range(8):
        if i % 2:
            body = {"messages": [{"role": "system", "content": TENANTS[i % 4]},
                                 {"role": "user", "content": f"Tell me a story number {i}."}]}
            path = "/v1/chat/completions"
        else:
            body = {"prompt": f"Story {i} ({kind}). Once upon a time in a village by the sea there lived " * 4}
            path = "/v1/completions"
        out.append((path, {**body, "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}, "ignore_eos": True}))
    return out


class Stream:
    """One streamed request read event by event: its text, usage, finish reasons, ids and errors."""

    def __init__(self, url: str, path: str, body: dict[str, Any]) -> None:
        self.url, self.path, self.body = url, path, body
        self.text = ""
        self.usage: dict | None = None
        self.finish: list[str] = []
        self.ids: set[str] = set()
        self.errors: list[Any] = []
        self.pieces = 0
        self.done = False
        self.internal_fields = False

    def run(self) -> "Stream":
        chat = self.path.endswith("chat/completions")
        with httpx.Client(timeout=180) as client, client.stream("POST", self.url + self.path, json=self.body) as reply:
            assert reply.status_code == 200, reply.read()
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.errors.append(event["error"])
                    continue
                self.ids.add(event["id"])
                self.internal_fields |= "prompt_token_ids" in event
                if event.get("usage"):
                    self.usage = event["usage"]
                for choice in event["choices"]:
                    self.internal_fields |= "token_ids" in choice
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if piece:
                        self.text += piece
                        self.pieces += 1
                    if choice.get("finish_reason"):
                        self.finish.append(choice["finish_reason"])
        return self


def run_all(url: str, requests: list[tuple[str, dict]], during=None) -> list[Stream]:
    streams = [Stream(url, path, body) for path, body in requests]
    with ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(s.run) for s in streams]
        if during is not None:
            during(streams)
        for future in futures:
            future.result(timeout=300)
    return streams


def kill_busiest(router_url: str, workers: dict[str, Proc], streams: list[Stream], pool: str) -> str:
    """Once every stream has text, SIGKILL the worker of ``pool`` the router has the most requests at."""
    deadline = time.monotonic() + 120
    while not all(s.pieces >= 3 for s in streams):
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.02)
    health = httpx.get(router_url + "/health").json()["workers"]
    victim = max((w for w in health if w["pool"] == pool), key=lambda w: w["inflight"])
    assert victim["inflight"] > 0
    workers[victim["url"]].kill(signal.SIGKILL)
    return victim["url"]


def assert_same_as_uninterrupted(streams: list[Stream], expected: list[Stream]) -> None:
    for got, want in zip(streams, expected):
        assert not got.errors, got.errors
        assert got.done
        assert got.text == want.text
        assert got.usage == want.usage or {k: got.usage[k] for k in ("prompt_tokens", "completion_tokens")} == \
            {k: want.usage[k] for k in ("prompt_tokens", "completion_tokens")}
        assert got.usage["completion_tokens"] == MAX_TOKENS
        assert got.finish == ["length"]
        assert len(got.ids) == 1  # one id across the seam
        assert not got.internal_fields


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("migration")
    procs: list[Proc] = []
    try:
        workers = dict(start_engine("serve", tmp, f"worker{i}") for i in range(2))
        procs += workers.values()
        for url, proc in workers.items():
            proc.wait_healthy(url)
        router_url, router = start_router(tmp, *sum((["--worker", u] for u in workers), []))
        procs.append(router)
        router.wait_healthy(router_url, 60)
        yield router_url, workers, tmp
    finally:
        stop_all(procs)


def engine_stream(url: str, body: dict[str, Any]) -> tuple[str, list[int], list[int]]:
    """(text, generated token ids, prompt token ids) of a completions stream asking for token ids."""
    text, ids, prompt = "", [], []
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", url + "/v1/completions", json={**body, "model": MODEL, "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                for choice in event["choices"]:
                    text += choice["text"]
                    ids += choice["token_ids"]
                    prompt = choice.get("prompt_token_ids", prompt)
    return text, ids, prompt


@pytest.mark.parametrize("params", [
    {"temperature": 0, "stop": [" the sea"]},  # a stop string that ends after the seam, held back across it
    {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5},  # penalties count earlier output
    {"temperature": 0.9, "seed": 1234},  # seeded sampling: the continuation skips the earlier draws
    {"temperature": 0, "structured_outputs": {"regex": "[A-Za-z ,]{30,80}"}},  # the grammar advanced over it
])
def test_a_continuation_resumes_exactly_where_the_output_was(aggregated, params):
    url = next(iter(aggregated[1]))
    body = {"prompt": "Once upon a time in a village by the sea, there lived", "max_tokens": 30, **params}
    text, ids, prompt = engine_stream(url, body)
    assert len(ids) >= 8, (text, ids)
    seam = 6
    # What a client had after 6 tokens: their text, less what a stop string's hold-back kept.
    seen = len(httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": ids[:seam]}).json()["prompt"]) - 3
    rest, rest_ids, _ = engine_stream(url, {**body, "max_tokens": 30 - seam, "tandem_continuation": {
        "prompt_token_ids": prompt + ids[:seam], "num_output_tokens": seam, "num_output_chars": seen}})
    assert ids[:seam] + rest_ids == ids
    assert text[:seen] + rest == text


def test_killing_the_busiest_aggregated_worker_loses_no_stream(aggregated):
    router_url, workers, tmp = aggregated
    requests = requests_for("aggregated")
    expected = run_all(router_url, requests)
    assert all(s.usage and s.usage["completion_tokens"] == MAX_TOKENS and not s.errors for s in expected)
    migrations = router_metric(router_url, "tandem:router_migrations_total")
    streams = run_all(router_url, requests, lambda streams: kill_busiest(router_url, workers, streams, "aggregated"))
    assert_same_as_uninterrupted(streams, expected)
    assert router_metric(router_url, "tandem:router_migrations_total") - migrations >= 1
    assert "migrating from" in (tmp / "router.log").read_text()
    assert router_metric(router_url, "tandem:router_worker_ejections_total") >= 1


@pytest.fixture(scope="module")
def disaggregated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("migration_pd")
    procs: list[Proc] = []
    try:
        prefill_url, prefill = start_engine("prefill", tmp, "prefill")
        decodes = dict(start_engine("decode", tmp, f"decode{i}") for i in range(2))
        procs += [prefill, *decodes.values()]
        prefill.wait_healthy(prefill_url)
        for url, proc in decodes.items():
            proc.wait_healthy(url)
        router_url, router = start_router(tmp, "--prefill", prefill_url, *sum((["--decode", u] for u in decodes), []),
                                          "--disagg-threshold", "48")
        procs.append(router)
        router.wait_healthy(router_url, 60)
        yield router_url, decodes, tmp
    finally:
        stop_all(procs)


def test_killing_the_busiest_decode_worker_migrates_to_the_other(disaggregated):
    router_url, decodes, tmp = disaggregated
    requests = requests_for("pd")
    expected = run_all(router_url, requests)
    assert all(s.usage and s.usage["completion_tokens"] == MAX_TOKENS and not s.errors for s in expected)
    assert router_metric(router_url, "tandem:router_decisions_total", decision="disaggregated") >= 8
    streams = run_all(router_url, requests, lambda streams: kill_busiest(router_url, decodes, streams, "decode"))
    assert_same_as_uninterrupted(streams, expected)
    assert router_metric(router_url, "tandem:router_migrations_total") >= 1
