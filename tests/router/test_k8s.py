"""Kubernetes discovery against a small API server speaking pods list + watch (label selectors, 410 Gone)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tandem.router.k8s import KubernetesDiscovery, pod_url
from tandem.router.workers import Datastore, Pool

from .peers import free_port, serve_app, stop_app
from .test_proxy import wait_for


def make_pod(name: str, ip: str, role: str, ready: bool = True, version: int = 1) -> dict:
    return {"metadata": {"name": name, "labels": {"role": role}, "resourceVersion": str(version)},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeAPIServer:
    """Pods in one namespace; watches get the events pushed after they connect; ``expire_next`` answers 410 once."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.version = 10
        self.watchers: list[tuple[str, asyncio.Queue]] = []
        self.expire_next = False
        self.lists = 0
        self.tokens: list[str] = []

    def matches(self, pod: dict, selector: str) -> bool:
        key, _, value = selector.partition("=")
        return pod["metadata"]["labels"].get(key) == value

    def push(self, kind: str, pod: dict) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.pods.pop(pod["metadata"]["name"], None)
        else:
            self.pods[pod["metadata"]["name"]] = pod
        for selector, queue in self.watchers:
            if self.matches(pod, selector):
                queue.put_nowait({"type": kind, "object": pod})

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/v1/namespaces/{ns}/pods")
        async def pods(ns: str, request: Request) -> Response:
            assert ns == "llm"
            self.tokens.append(request.headers.get("authorization", ""))
            selector = request.query_params["labelSelector"]
            if request.query_params.get("watch") != "1":
                self.lists += 1
                items = [p for p in self.pods.values() if self.matches(p, selector)]
                return JSONResponse({"kind": "PodList", "metadata": {"resourceVersion": str(self.version)}, "items": items})
            if self.expire_next:
                self.expire_next = False
                return JSONResponse({"kind": "Status", "code": 410, "reason": "Expired"}, status_code=410)
            queue: asyncio.Queue = asyncio.Queue()
            self.watchers.append((selector, queue))

            async def events():
                try:
                    while True:
                        yield json.dumps(await queue.get()) + "\n"
                finally:
                    self.watchers.remove((selector, queue))

            return StreamingResponse(events(), media_type="application/json")

        return app


def test_pod_url_requires_ready_running_pods():
    assert pod_url(make_pod("a", "10.0.0.1", "decode"), 8000) == "http://10.0.0.1:8000"
    assert pod_url(make_pod("a", "10.0.0.1", "decode", ready=False), 8000) is None
    terminating = make_pod("a", "10.0.0.1", "decode")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_url(terminating, 8000) is None


async def test_discovery_lists_watches_and_relists():
    api = FakeAPIServer()
    api.pods["p0"] = make_pod("p0", "10.0.0.1", "prefill")
    api.pods["d0"] = make_pod("d0", "10.0.0.2", "decode")
    api.pods["d1"] = make_pod("d1", "10.0.0.3", "decode", ready=False)
    port = free_port()
    server, task = await serve_app(api.app(), port)
    datastore = Datastore()
    discovery = KubernetesDiscovery(datastore, f"http://127.0.0.1:{port}", "llm",
                                    {Pool.PREFILL: "role=prefill", Pool.DECODE: "role=decode"}, 8000, token="t0k",
                                    backoff_s=0.05)
    running = asyncio.create_task(discovery.run())
    try:
        await wait_for(lambda: len(api.watchers) == 2)
        assert {u: w.pool for u, w in datastore.workers.items()} == {
            "http://10.0.0.1:8000": Pool.PREFILL, "http://10.0.0.2:8000": Pool.DECODE}
        assert api.tokens[0] == "Bearer t0k"
        api.push("MODIFIED", make_pod("d1", "10.0.0.3", "decode", ready=True))
        await wait_for(lambda: "http://10.0.0.3:8000" in datastore.workers)
        api.push("MODIFIED", make_pod("d0", "10.0.0.2", "decode", ready=False))
        await wait_for(lambda: "http://10.0.0.2:8000" not in datastore.workers)
        api.push("DELETED", make_pod("p0", "10.0.0.1", "prefill"))
        await wait_for(lambda: "http://10.0.0.1:8000" not in datastore.workers)
        # The watch breaks and history is gone: the next watch gets 410, discovery lists again.
        lists = api.lists
        api.expire_next = True
        for _, queue in list(api.watchers):
            queue.put_nowait({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})
        api.pods["p1"] = make_pod("p1", "10.0.0.9", "prefill")  # appeared while we were not watching
        await wait_for(lambda: "http://10.0.0.9:8000" in datastore.workers and api.lists > lists)
        assert set(datastore.workers) == {"http://10.0.0.3:8000", "http://10.0.0.9:8000"}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await stop_app(server, task)
