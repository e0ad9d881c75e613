"""Worker discovery in Kubernetes: list + watch pods by label selector, keep the ready ones in the datastore.

Plain httpx against the API server with the pod's service-account token and CA (no client library): one
list to get the current pods and a resourceVersion, then a watch from it; a watch that ends is resumed from the
last version seen, a 410 Gone (history compacted) or any error leads to a fresh list after a backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tandem.router.config import RouterConfig
from tandem.router.workers import Datastore, Pool

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class WatchExpired(Exception):
    """The API server no longer has the history to resume a watch (HTTP 410 / an ERROR event with code 410)."""


def pod_url(pod: dict[str, Any], port: int) -> str | None:
    """``http://<podIP>:<port>`` for a running, ready pod that is not being deleted; otherwise None."""
    metadata, status = pod.get("metadata", {}), pod.get("status", {})
    if metadata.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return f"http://{status['podIP']}:{port}" if ready else None


@dataclass(slots=True)
class PoolWatch:
    """One pool's label selector and the pods (name -> URL) it currently contributes."""

    pool: Pool
    selector: str
    pods: dict[str, str]


class KubernetesDiscovery:
    """Keeps the datastore's members equal to the ready pods matching each pool's selector."""

    def __init__(self, datastore: Datastore, api_url: str, namespace: str, selectors: dict[Pool, str], port: int,
                 token: str | None = None, verify: ssl.SSLContext | bool = True, backoff_s: float = 1.0) -> None:
        self._datastore = datastore
        self._namespace = namespace
        self._port = port
        self._backoff_s = backoff_s
        self._watches = [PoolWatch(pool, selector, {}) for pool, selector in selectors.items() if selector]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=api_url, headers=headers, verify=verify,
                                         timeout=httpx.Timeout(10.0, read=330.0))

    @classmethod
    def from_config(cls, config: RouterConfig, datastore: Datastore) -> "KubernetesDiscovery":
        """In-cluster settings: the API server from the service env, the service-account token and CA.
        ``TANDEM_K8S_API_URL`` overrides the API server (used with a local API emulator)."""
        api_url = os.environ.get("TANDEM_K8S_API_URL")
        token_file = SERVICE_ACCOUNT / "token"
        token = token_file.read_text().strip() if token_file.exists() else None
        verify: ssl.SSLContext | bool = True
        if api_url is None:
            host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            api_url = f"https://{host}:{port}"
            ca = SERVICE_ACCOUNT / "ca.crt"
            if ca.exists():
                verify = ssl.create_default_context(cafile=str(ca))
        selectors = {Pool.PREFILL: config.k8s_prefill_selector, Pool.DECODE: config.k8s_decode_selector,
                     Pool.AGGREGATED: config.k8s_worker_selector}
        namespace = config.k8s_namespace
        if namespace is None:
            namespace_file = SERVICE_ACCOUNT / "namespace"
            namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
        return cls(datastore, api_url, namespace,
                   {p: s for p, s in selectors.items() if s}, config.k8s_port, token, verify)

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._follow(w) for w in self._watches))
        finally:
            await self._client.aclose()

    async def _follow(self, watch: PoolWatch) -> None:
        path = f"/api/v1/namespaces/{self._namespace}/pods"
        while True:
            try:
                version = await self._list(path, watch)
                while True:
                    version = await self._watch(path, watch, version)
            except WatchExpired:
                logger.info("pod watch for %s expired; listing again", watch.selector)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                logger.warning("Kubernetes discovery for %s failed (%s); retrying", watch.selector, exc)
                await asyncio.sleep(self._backoff_s)

    async def _list(self, path: str, watch: PoolWatch) -> str:
        response = await self._client.get(path, params={"labelSelector": watch.selector})
        response.raise_for_status()
        body = response.json()
        pods = {}
        for pod in body.get("items", ()):
            url = pod_url(pod, self._port)
            if url is not None:
                pods[pod["metadata"]["name"]] = url
        for name in set(watch.pods) - set(pods):
            self._set(watch, name, None)
        for name, url in pods.items():
            self._set(watch, name, url)
        return body["metadata"]["resourceVersion"]

    async def _watch(self, path: str, watch: PoolWatch, version: str) -> str:
        params = {"labelSelector": watch.selector, "watch": "1", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        async with self._client.stream("GET", path, params=params) as response:
            if response.status_code == 410:
                raise WatchExpired()
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, pod = event.get("type"), event.get("object", {})
                if kind == "ERROR":
                    if pod.get("code") == 410:
                        raise WatchExpired()
                    raise ValueError(f"watch error: {pod.get('message')}")
                version = pod.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                self._set(watch, name, None if kind == "DELETED" else pod_url(pod, self._port))
        return version

    def _set(self, watch: PoolWatch, name: str, url: str | None) -> None:
        old = watch.pods.get(name)
        if old == url:
            return
        if old is not None:
            del watch.pods[name]
            if old not in self._urls_in_use():
                self._datastore.remove(old)
            logger.info("discovery: %s pod %s (%s) left", watch.pool, name, old)
        if url is not None:
            watch.pods[name] = url
            self._datastore.add(url, watch.pool)
            logger.info("discovery: %s pod %s ready at %s", watch.pool, name, url)

    def _urls_in_use(self) -> set[str]:
        return {url for w in self._watches for url in w.pods.values()}
