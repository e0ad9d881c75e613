"""Mid-stream migration in the router, over real HTTP with small deterministic test peers (fast).

The peers speak the engine's side of the contract (``return_token_ids``, ``tandem_continuation``) with a
"model" whose next token is a function of the previous one, so an uninterrupted run is known exactly. The same
behaviour with real engines and SIGKILL is in test_migration_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tandem.router.app import build_app
from tandem.router.config import RouterConfig

from .peers import free_port, serve_app, stop_app


def next_token(last: int) -> int:
    return (31 * last + 7) % 997


def token_text(token: int) -> str:
    return f"t{token} "


def generate(prompt: list[int], n: int) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = next_token(last)
        out.append(last)
    return out


class Crash(Exception):
    """Raised in a peer's stream body: the server drops the connection."""


@dataclass
class TokenPeer:
    """A worker whose original (non-continuation) streams fail after ``fail_after`` tokens, as ``mode`` says:
    drop (connection reset), eof (ends without [DONE]), error (an error event), stall (goes silent)."""

    name: str
    mode: str = "drop"
    fail_after: int | None = None
    fail_continuations: bool = False
    port: int = field(default_factory=free_port)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"})

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response("", media_type="text/plain")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self.serve(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self.serve(await request.json(), chat=True)

        return app

    async def serve(self, body: dict[str, Any], chat: bool) -> Response:
        self.bodies.append(body)
        continuation = body.get("tandem_continuation")
        if continuation:
            prompt = continuation["prompt_token_ids"]
        elif chat:
            prompt = [ord(c) for m in body["messages"] for c in m["content"]]
        else:
            prompt = [ord(c) for c in body["prompt"]]
        tokens = generate(prompt, body["max_tokens"])
        fail_after = None if continuation and not self.fail_continuations else self.fail_after
        with_ids = body.get("return_token_ids") is True
        usage = (body.get("stream_options") or {}).get("include_usage")
        base = {"id": f"{self.name}-{len(self.bodies)}", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": len(self.bodies), "model": "m"}

        def chunk(choice: dict[str, Any], **extra: Any) -> str:
            return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

        async def events() -> AsyncIterator[str]:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                            **({"prompt_token_ids": prompt} if with_ids else {}))
            for i, token in enumerate(tokens):
                if fail_after is not None and i == fail_after:
                    if self.mode == "drop":
                        raise Crash(self.name)
                    if self.mode == "error":
                        yield ('data: {"error": {"message": "engine died", "type": "server_error", "param": null, '
                               '"code": "engine_unavailable"}}\n\n')
                        yield "data: [DONE]\n\n"
                    if self.mode == "stall":
                        await asyncio.sleep(3600)
                    return
                last = i == len(tokens) - 1
                choice: dict[str, Any] = ({"index": 0, "delta": {"content": token_text(token)}} if chat
                                          else {"index": 0, "text": token_text(token)})
                choice["finish_reason"] = "length" if last else None
                if with_ids:
                    choice["token_ids"] = [token]
                    if not chat and i == 0:
                        choice["prompt_token_ids"] = prompt
                yield chunk(choice)
                await asyncio.sleep(0.005)
            if usage:
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': {'prompt_tokens': len(prompt), 'completion_tokens': len(tokens), 'total_tokens': len(prompt) + len(tokens)}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def running(peers: list[TokenPeer], **config_kw: Any) -> AsyncIterator[tuple[Any, str]]:
    servers = []
    for peer in peers:
        server = uvicorn.Server(uvicorn.Config(peer.app(), host="127.0.0.1", port=peer.port, log_level="error",
                                               lifespan="off"))
        servers.append((server, asyncio.create_task(server.serve())))
        while not server.started:
            await asyncio.sleep(0.01)
    config = RouterConfig(served_model_name="m", worker_urls=tuple(p.url for p in peers), health_interval_s=0.2,
                          retry_backoff_s=0.01, **config_kw)
    app = build_app(config, None)
    port = free_port()
    router, task = await serve_app(app, port)
    try:
        await asyncio.wait_for(app.state.service.health.checked.wait(), 10)
        yield app.state.service, f"http://127.0.0.1:{port}"
    finally:
        await stop_app(router, task)
        for server, serving in servers:
            server.should_exit = server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(serving, 5)


async def stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The client's view: every data event's JSON, in order ([DONE] must end the stream)."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url + path, json=body) as response:
            assert response.status_code == 200
            raw = (await response.aread()).decode()
    parts = [p for p in raw.split("\n\n") if p.strip()]
    assert parts[-1] == "data: [DONE]", raw[-300:]
    for part in parts[:-1]:
        assert part.startswith("data: "), part
        events.append(json.loads(part[6:]))
    return events


def text_of(events: list[dict[str, Any]], chat: bool) -> str:
    key = (lambda c: (c.get("delta") or {}).get("content") or "") if chat else (lambda c: c.get("text") or "")
    return "".join(key(c) for e in events for c in e.get("choices", []))


def metric(service: Any, reason: str) -> float:
    return service.metrics.migrations.labels(reason)._value.get()


@pytest.mark.parametrize("mode,reason", [("drop", "connection_error"), ("eof", "eof"), ("error", "error_event"),
                                         ("stall", "stall")])
async def test_a_stream_failing_mid_way_resumes_on_the_other_worker(mode, reason):
    peers = [TokenPeer("a", mode, fail_after=5), TokenPeer("b", mode, fail_after=5)]
    async with running(peers, stream_stall_timeout_s=0.5) as (service, url):
        prompt = "Once upon a time"
        events = await stream(url, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 12, "stream": True,
                                                       "stream_options": {"include_usage": True}})
        expected = generate([ord(c) for c in prompt], 12)
        assert text_of(events, chat=False) == "".join(token_text(t) for t in expected)
        # One finish, one usage for the whole request, and no internal field reached the client.
        assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] == ["length"]
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage == [{"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}]
        assert not any("token_ids" in c or "prompt_token_ids" in e for e in events for c in e["choices"])
        assert len({e["id"] for e in events}) == 1
        assert metric(service, reason) == 1
        # The continuation: the prompt plus the 5 tokens already generated, 7 tokens left to generate.
        continuation = [b for p in peers for b in p.bodies if "tandem_continuation" in b]
        assert len(continuation) == 1
        assert continuation[0]["tandem_continuation"] == {
            "prompt_token_ids": [ord(c) for c in prompt] + expected[:5], "num_output_tokens": 5,
            "num_output_chars": len("".join(token_text(t) for t in expected[:5]))}
        assert continuation[0]["max_tokens"] == 7


async def test_a_chat_stream_resumes_with_one_role_chunk_and_the_original_id():
    peers = [TokenPeer("a", "drop", fail_after=3), TokenPeer("b", "drop", fail_after=3)]
    async with running(peers) as (service, url):
        messages = [{"role": "user", "content": "Hi there"}]
        events = await stream(url, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 9,
                                                            "stream": True, "min_tokens": 4})
        expected = generate([ord(c) for c in "Hi there"], 9)
        assert text_of(events, chat=True) == "".join(token_text(t) for t in expected)
        roles = [c["delta"]["role"] for e in events for c in e["choices"] if "role" in c.get("delta", {})]
        assert roles == ["assistant"]
        assert len({e["id"] for e in events}) == 1
        continuation = [b for p in peers for b in p.bodies if "tandem_continuation" in b][0]
        assert continuation["min_tokens"] == 1 and continuation["max_tokens"] == 6


async def test_a_stream_failing_more_than_max_migrations_times_ends_with_an_error():
    peers = [TokenPeer(name, "drop", fail_after=2, fail_continuations=True) for name in "abc"]
    async with running(peers, max_migrations=1) as (service, url):
        events = await stream(url, "/v1/completions", {"model": "m", "prompt": "abc", "max_tokens": 8, "stream": True})
        assert "max-migrations=1" in events[-1]["error"]["message"]
        # What the two workers generated before failing reached the client once, in order.
        assert text_of(events[:-1], chat=False) == "".join(token_text(t) for t in generate([ord(c) for c in "abc"], 4))
        assert metric(service, "connection_error") == 1


async def test_a_client_asking_for_token_ids_gets_them_all():
    peers = [TokenPeer("a", "drop", fail_after=4), TokenPeer("b", "drop", fail_after=4)]
    async with running(peers) as (service, url):
        events = await stream(url, "/v1/completions", {"model": "m", "prompt": "xyz", "max_tokens": 10, "stream": True,
                                                       "return_token_ids": True})
        ids = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
        assert ids == generate([ord(c) for c in "xyz"], 10)
