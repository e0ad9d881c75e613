"""A test client that drives disaggregated serving itself: prefill, then decode with the returned params."""

from __future__ import annotations

import json
import time

import httpx

from procs import metric_value

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048  # every disagg test engine's --max-model-len
LEASE_S = 8.0  # long enough that a loaded CI machine still sees the blocks held before expiry


def completion_body(prompt, max_tokens: int = 12, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def prefill_params(client: httpx.Client, prefill_url: str, body: dict, path: str = "/v1/completions") -> dict:
    """Run the prompt on the prefill worker (max_tokens 1, not streamed); return its ``kv_transfer_params``."""
    req = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    req.pop("stream_options", None)
    r = client.post(f"{prefill_url}{path}", json=req)
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    return params


def completion_text(client: httpx.Client, url: str, body: dict, path: str = "/v1/completions") -> str:
    """Text of a completion (``stream`` in ``body`` decides whether SSE chunks are joined)."""
    if not body.get("stream"):
        r = client.post(f"{url}{path}", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    parts = []
    for event in sse_events(client, f"{url}{path}", body):
        assert "error" not in event, event
        for choice in event["choices"]:
            parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def sse_events(client: httpx.Client, url: str, body: dict) -> list[dict]:
    events = []
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def disagg_text(client: httpx.Client, prefill_url: str, decode_url: str, body: dict,
                path: str = "/v1/completions") -> str:
    params = prefill_params(client, prefill_url, body, path)
    return completion_text(client, decode_url, {**body, "kv_transfer_params": params}, path)


def metrics(client: httpx.Client, url: str) -> str:
    return client.get(f"{url}/metrics").text


def kv_metric(text: str, name: str, role: str, **labels: str) -> float:
    """A ``tandem:kv_transfer_*`` sample (0 when the labelled series does not exist yet)."""
    try:
        return metric_value(text, f"tandem:kv_transfer_{name}", role=role, **labels)
    except KeyError:
        return 0.0


def wait_all_blocks_free(client: httpx.Client, url: str, timeout: float = 10.0) -> tuple[float, float]:
    """Poll /metrics until every KV block is free; return (free, total) as last seen."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(client, url)
        free = metric_value(text, "tandem:kv_cache_blocks_free")
        total = metric_value(text, "tandem:kv_cache_blocks_total")
        if free == total or time.monotonic() > deadline:
            return free, total
        time.sleep(0.1)
