"""Kubernetes discovery against a small API server speaking pods list + watch as kubernetes_asyncio calls them
(label selectors, bookmarks, 410 Gone), and each pod's engine kind from its label."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from kubernetes_asyncio.client import Configuration, V1ObjectMeta, V1Pod, V1PodCondition, V1PodStatus
from starlette.responses import JSONResponse, Response, StreamingResponse

from tandem.kube import KubeConnection
from tandem.router.k8s import KubernetesDiscovery, pod_kind, pod_url
from tandem.router.workers import Datastore, Pool

from .peers import free_port, serve_app, stop_app
from .test_proxy import wait_for


def make_pod(name: str, ip: str, role: str, ready: bool = True, version: int = 1, kind: str | None = None) -> dict:
    labels = {"role": role} | ({"tandem.dev/engine-kind": kind} if kind else {})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "resourceVersion": str(version)},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def v1pod(name: str, ip: str, ready: bool = True, labels: dict[str, str] | None = None,
          deleting: bool = False) -> V1Pod:
    return V1Pod(metadata=V1ObjectMeta(name=name, labels=labels or {},
                                       deletion_timestamp="2026-01-01T00:00:00Z" if deleting else None),
                 status=V1PodStatus(phase="Running", pod_ip=ip, conditions=[
                     V1PodCondition(type="Ready", status="True" if ready else "False")]))


def connection(url: str, token: str | None = None) -> KubeConnection:
    configuration = Configuration(host=url)
    if token:
        configuration.api_key["BearerToken"] = f"Bearer {token}"
    return KubeConnection(configuration)


class FakeAPIServer:
    """Pods in one namespace; watches get the events pushed after they connect; ``expire_next`` answers 410 once."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.version = 10
        self.watchers: list[tuple[str, asyncio.Queue]] = []
        self.expire_next = False
        self.lists = 0
        self.tokens: list[str] = []
        self.watch_params: list[dict[str, str]] = []
        self.accepted: set[str] | None = None  # bearer tokens let in (None: any)

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
            if self.accepted is not None and self.tokens[-1].removeprefix("Bearer ") not in self.accepted:
                return JSONResponse({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 401,
                                     "reason": "Unauthorized", "message": "Unauthorized"}, status_code=401)
            selector = request.query_params["labelSelector"]
            if request.query_params.get("watch", "").lower() not in ("1", "true"):
                self.lists += 1
                items = [p for p in self.pods.values() if self.matches(p, selector)]
                return JSONResponse({"kind": "PodList", "metadata": {"resourceVersion": str(self.version)}, "items": items})
            self.watch_params.append(dict(request.query_params))
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
    assert pod_url(v1pod("a", "10.0.0.1"), 8000) == "http://10.0.0.1:8000"
    assert pod_url(v1pod("a", "10.0.0.1", ready=False), 8000) is None
    assert pod_url(v1pod("a", "10.0.0.1", deleting=True), 8000) is None


def test_pod_kind_comes_from_the_engine_kind_label():
    assert pod_kind(v1pod("a", "10.0.0.1")) == "tandem"  # absent: our own engine
    assert pod_kind(v1pod("a", "10.0.0.1", labels={"tandem.dev/engine-kind": "vllm"})) == "vllm"
    assert pod_kind(v1pod("a", "10.0.0.1", labels={"tandem.dev/engine-kind": "sglang"})) is None


async def test_discovery_lists_watches_and_relists():
    api = FakeAPIServer()
    api.pods["p0"] = make_pod("p0", "10.0.0.1", "prefill")
    api.pods["d0"] = make_pod("d0", "10.0.0.2", "decode")
    api.pods["d1"] = make_pod("d1", "10.0.0.3", "decode", ready=False)
    port = free_port()
    server, task = await serve_app(api.app(), port)
    datastore = Datastore()

    async def connect() -> KubeConnection:
        return connection(f"http://127.0.0.1:{port}", token="t0k")

    discovery = KubernetesDiscovery(datastore, {Pool.PREFILL: "role=prefill", Pool.DECODE: "role=decode"}, 8000,
                                    namespace="llm", connect=connect, backoff_s=0.05)
    running = asyncio.create_task(discovery.run())
    try:
        await wait_for(lambda: len(api.watchers) == 2)
        assert {u: (w.pool, w.kind) for u, w in datastore.workers.items()} == {
            "http://10.0.0.1:8000": (Pool.PREFILL, "tandem"), "http://10.0.0.2:8000": (Pool.DECODE, "tandem")}
        assert set(api.tokens) == {"Bearer t0k"}
        # The watch resumes from the listing's version, asks for bookmarks and ends on the server's side.
        assert api.watch_params[0]["resourceVersion"] == "10"
        assert api.watch_params[0]["allowWatchBookmarks"].lower() == "true"
        assert api.watch_params[0]["timeoutSeconds"] == "300"
        api.push("MODIFIED", make_pod("d1", "10.0.0.3", "decode", ready=True, kind="vllm"))
        await wait_for(lambda: "http://10.0.0.3:8000" in datastore.workers)
        assert datastore.workers["http://10.0.0.3:8000"].kind == "vllm"
        api.push("MODIFIED", make_pod("d0", "10.0.0.2", "decode", ready=False))
        await wait_for(lambda: "http://10.0.0.2:8000" not in datastore.workers)
        api.push("DELETED", make_pod("p0", "10.0.0.1", "prefill"))
        await wait_for(lambda: "http://10.0.0.1:8000" not in datastore.workers)
        # The watch breaks and history is gone: the next watch gets 410, discovery lists again.
        lists = api.lists
        api.expire_next = True
        for _, queue in list(api.watchers):
            queue.put_nowait({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                             "code": 410, "reason": "Expired", "message": "too old"}})
        api.pods["p1"] = make_pod("p1", "10.0.0.9", "prefill")  # appeared while we were not watching
        await wait_for(lambda: "http://10.0.0.9:8000" in datastore.workers and api.lists > lists)
        assert set(datastore.workers) == {"http://10.0.0.3:8000", "http://10.0.0.9:8000"}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await stop_app(server, task)


async def test_discovery_connects_again_when_its_token_is_refused():
    """An exec plugin's or OIDC token expires: the API server answers 401 and discovery builds a fresh
    connection (running the plugin again) instead of retrying the dead token for ever."""
    api = FakeAPIServer()
    api.pods["d0"] = make_pod("d0", "10.0.0.2", "decode")
    api.accepted = {"t1"}
    port = free_port()
    server, task = await serve_app(api.app(), port)
    datastore = Datastore()
    issued: list[str] = []

    async def connect() -> KubeConnection:
        issued.append(f"t{len(issued) + 1}")
        return connection(f"http://127.0.0.1:{port}", token=issued[-1])

    discovery = KubernetesDiscovery(datastore, {Pool.DECODE: "role=decode"}, 8000, namespace="llm",
                                    connect=connect, backoff_s=0.05)
    running = asyncio.create_task(discovery.run())
    try:
        await wait_for(lambda: len(api.watchers) == 1)
        assert set(datastore.workers) == {"http://10.0.0.2:8000"}
        api.accepted = {"t2"}  # t1 expired
        api.pods["d1"] = make_pod("d1", "10.0.0.3", "decode")
        for _, queue in list(api.watchers):  # the watch ends; the next list meets the 401
            queue.put_nowait({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                         "code": 410, "reason": "Expired", "message": "too old"}})
        await wait_for(lambda: "http://10.0.0.3:8000" in datastore.workers)
        assert issued == ["t1", "t2"] and api.tokens[-1] == "Bearer t2"
        assert set(datastore.workers) == {"http://10.0.0.2:8000", "http://10.0.0.3:8000"}
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await stop_app(server, task)
