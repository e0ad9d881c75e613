"""Small real HTTP peers for router tests: processes-free workers that speak the documented worker contract.

They are test peers (like a fake API server), not stand-ins for the engine: they serve /health, /metrics,
/v1/models, completions and chat (streaming or not, with the kv_transfer_params protocol) and the direct
KV-event channel, and can be told to misbehave (refuse, die before the first byte, die mid-stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tandem.ports import free_port
from tandem.protocol.kv_events import BlockRemoved, BlockStored, EventBatch


class PeerCrash(Exception):
    """Raised inside a peer's streaming body to make it drop the connection."""


@dataclass
class PeerWorker:
    """One worker on 127.0.0.1:port. ``mode``: ok | refuse (503) | drop_first (dies before the first byte of
    the body) | die_mid (dies after two chunks). ``delay_s`` delays every answer; ``chunks`` is the stream length."""

    name: str
    model: str = "m"
    mode: str = "ok"
    chunks: int = 4
    delay_s: float = 0.0
    block_size: int = 16
    port: int = field(default_factory=free_port)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    blocks: set[int] = field(default_factory=set)
    seq: int = 0
    waiting: int = 0
    healthy: bool = True
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        self._subscribers: list[asyncio.Queue] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- KV events ----

    def store(self, hashes: list[int]) -> dict[str, Any]:
        """Record blocks as cached and publish a batch (returned, for tests that also XADD it)."""
        self.blocks.update(hashes)
        return self._publish([BlockStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[],
                                          block_size=self.block_size)])

    def remove(self, hashes: list[int]) -> dict[str, Any]:
        self.blocks.difference_update(hashes)
        return self._publish([BlockRemoved(block_hashes=list(hashes))])

    def _publish(self, events: list) -> dict[str, Any]:
        self.seq += 1
        message = {"kind": "batch", "worker": self.url, "model": self.model,
                   **EventBatch(seq=self.seq, ts=time.time(), events=events).to_dict()}
        for queue in self._subscribers:
            queue.put_nowait(message)
        return message

    def snapshot(self) -> dict[str, Any]:
        return {"kind": "snapshot", "worker": self.url, "model": self.model, "seq": self.seq,
                "block_size": self.block_size, "block_hashes": sorted(self.blocks)}

    # ---- HTTP ----

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"}, status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        @app.get("/metrics")
        async def metrics() -> Response:
            text = (f'vllm:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}\n'
                    f'vllm:num_requests_running{{model_name="{self.model}"}} 0.0\n'
                    f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} 0.1\n')
            return Response(text, media_type="text/plain")

        @app.get("/kv_events/stream")
        async def kv_events() -> Response:
            queue: asyncio.Queue = asyncio.Queue()
            self._subscribers.append(queue)

            async def lines():
                try:
                    yield json.dumps(self.snapshot()) + "\n"
                    while self._server is not None:  # a stopped worker's channel goes quiet and closes
                        try:
                            message = await asyncio.wait_for(queue.get(), 0.5)
                        except asyncio.TimeoutError:
                            message = {"kind": "heartbeat", "worker": self.url, "model": self.model,
                                       "seq": self.seq, "ts": time.time()}
                        yield json.dumps(message) + "\n"
                finally:
                    self._subscribers.remove(queue)

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        async def generate(request: Request, chat: bool) -> Response:
            body = await request.json()
            self.requests.append((request.url.path, body))
            self.request_ids.append(request.headers.get("x-request-id", ""))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.mode == "refuse":
                return JSONResponse({"error": {"message": "overloaded", "type": "service_unavailable",
                                               "param": None, "code": None}}, status_code=503)
            if body.get("max_tokens") == -1:
                return JSONResponse({"error": {"message": "max_tokens must be positive", "type": "invalid_request_error",
                                               "param": "max_tokens", "code": None}}, status_code=400)
            kv = body.get("kv_transfer_params") or {}
            headers: dict[str, str] = {}
            if not body.get("stream"):
                choice = ({"index": 0, "message": {"role": "assistant", "content": self.name}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": self.name, "finish_reason": "length"})
                reply: dict[str, Any] = {"id": "x", "object": "chat.completion" if chat else "text_completion",
                                         "created": 0, "model": self.model, "choices": [choice],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                if kv.get("do_remote_decode"):
                    reply["kv_transfer_params"] = {"do_remote_prefill": True, "remote_engine_id": self.name,
                                                   "remote_host": "127.0.0.1", "remote_port": 1, "remote_block_ids": [0, 1],
                                                   "remote_request_id": "r", "num_prompt_tokens": 3, "lease_seconds": 30}
                return JSONResponse(reply, headers=headers)

            async def events():
                for i in range(self.chunks):
                    if self.mode == "drop_first" or (self.mode == "die_mid" and i == 2) or self._server is None:
                        raise PeerCrash(self.name)
                    delta = {"content": f"{self.name}{i} "} if chat else None
                    choice = ({"index": 0, "delta": delta, "finish_reason": None} if chat
                              else {"index": 0, "text": f"{self.name}{i} ", "finish_reason": None})
                    chunk = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": 0, "model": self.model, "choices": [choice]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await generate(request, chat=True)

        return app

    async def start(self) -> None:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="error", lifespan="off",
                                timeout_keep_alive=self.keep_alive_s)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving (connections refused afterwards), like a killed worker."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
            self._server = None
            self._task = None


async def serve_app(app: Any, port: int) -> tuple[uvicorn.Server, asyncio.Task]:
    """Serve an ASGI app (the router) on 127.0.0.1:port inside the running loop, lifespan included."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task


async def stop_app(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 10)
