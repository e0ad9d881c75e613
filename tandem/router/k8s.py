"""Worker discovery in Kubernetes: list + watch pods by label selector, keep the ready ones in the datastore.

On ``kubernetes_asyncio`` (connected through :mod:`tandem.kube`: in-cluster service account, else the
kubeconfig): one list gives the current pods and a resourceVersion, then a watch from it; a watch that ends
is resumed from the last version seen (bookmarks included); a 410 Gone (history compacted) or any error
leads to a fresh list after a backoff. A pod's engine kind comes from its ``tandem.dev/engine-kind`` label.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kubernetes_asyncio.client import CoreV1Api, V1Pod
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from tandem.kube import KubeConfigError, KubeConnection, connect
from tandem.router.config import RouterConfig
from tandem.router.workers import WORKER_KINDS, Datastore, Pool

logger = logging.getLogger(__name__)

ENGINE_KIND_LABEL = "tandem.dev/engine-kind"
DEFAULT_ENGINE_KIND = "tandem"


class WatchExpired(Exception):
    """The API server no longer has the history to resume a watch (HTTP 410 / an ERROR event with code 410)."""


class Unauthorized(Exception):
    """The API server refused the credentials (401): an exec plugin's or OIDC token expired; connect again."""


def pod_url(pod: V1Pod, port: int) -> str | None:
    """``http://<podIP>:<port>`` for a running, ready pod that is not being deleted; otherwise None."""
    status = pod.status
    if pod.metadata.deletion_timestamp or status is None or status.phase != "Running" or not status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return f"http://{status.pod_ip}:{port}" if ready else None


def pod_kind(pod: V1Pod) -> str | None:
    """The engine a pod runs, from its ``tandem.dev/engine-kind`` label ("tandem" when absent); None (and a
    warning) for a kind the router cannot drive."""
    kind = (pod.metadata.labels or {}).get(ENGINE_KIND_LABEL, DEFAULT_ENGINE_KIND)
    if kind not in WORKER_KINDS:
        logger.warning("discovery: pod %s has %s=%r; expected one of %s; not routing to it",
                       pod.metadata.name, ENGINE_KIND_LABEL, kind, ", ".join(WORKER_KINDS))
        return None
    return kind


@dataclass(frozen=True, slots=True)
class Member:
    """What a pod contributes to the datastore."""

    url: str
    kind: str


@dataclass(slots=True)
class PoolWatch:
    """One pool's label selector and the pods (name -> member) it currently contributes."""

    pool: Pool
    selector: str
    pods: dict[str, Member]


class KubernetesDiscovery:
    """Keeps the datastore's members equal to the ready pods matching each pool's selector.

    ``namespace`` None means the connection's own (the pod's namespace in a cluster), else "default".
    """

    def __init__(self, datastore: Datastore, selectors: dict[Pool, str], port: int, *,
                 namespace: str | None = None,
                 connect: Callable[[], Awaitable[KubeConnection]] = connect,
                 backoff_s: float = 1.0, watch_timeout_s: int = 300) -> None:
        self._datastore = datastore
        self._namespace = namespace
        self._port = port
        self._connect = connect
        self._backoff_s = backoff_s
        self._watch_timeout_s = watch_timeout_s
        self._watches = [PoolWatch(pool, selector, {}) for pool, selector in selectors.items() if selector]

    @classmethod
    def from_config(cls, config: RouterConfig, datastore: Datastore) -> "KubernetesDiscovery":
        """The router's ``--k8s-*`` flags; the API server is found when :meth:`run` starts."""
        selectors = {Pool.PREFILL: config.k8s_prefill_selector, Pool.DECODE: config.k8s_decode_selector,
                     Pool.AGGREGATED: config.k8s_worker_selector}
        return cls(datastore, {p: s for p, s in selectors.items() if s}, config.k8s_port,
                   namespace=config.k8s_namespace)

    async def run(self) -> None:
        """Connect, then follow every pool's pods until cancelled; connect again when credentials expire."""
        while True:
            try:
                connection = await self._connect()
            except KubeConfigError as e:
                logger.error("Kubernetes discovery cannot start: %s", e)
                raise
            namespace = self._namespace or connection.default_namespace or "default"
            try:
                async with connection.api_client("tandem-router") as api_client, asyncio.TaskGroup() as group:
                    core = CoreV1Api(api_client)
                    for watch in self._watches:
                        group.create_task(self._follow(core, namespace, watch))
            except* Unauthorized:
                logger.warning("the API server refused the router's credentials (401); connecting again")
                await asyncio.sleep(self._backoff_s)

    async def _follow(self, core: CoreV1Api, namespace: str, watch: PoolWatch) -> None:
        while True:
            try:
                version = await self._list(core, namespace, watch)
                while True:
                    version = await self._watch(core, namespace, watch, version)
            except WatchExpired:
                logger.info("pod watch for %s expired; listing again", watch.selector)
            except ApiException as exc:
                if exc.status == 401:
                    raise Unauthorized(str(exc.reason)) from None
                logger.warning("Kubernetes discovery for %s failed (%s); retrying", watch.selector, exc.reason)
                await asyncio.sleep(self._backoff_s)
            # NOTE: anything else too: the library raises bare Exceptions for malformed watch lines and KeyError
            # for ERROR events missing a field, and discovery must outlive a bad answer.
            except Exception as exc:  # noqa: BLE001
                logger.warning("Kubernetes discovery for %s failed (%s); retrying", watch.selector, exc)
                await asyncio.sleep(self._backoff_s)

    async def _list(self, core: CoreV1Api, namespace: str, watch: PoolWatch) -> str:
        listing = await core.list_namespaced_pod(namespace, label_selector=watch.selector, _request_timeout=30)
        pods = {}
        for pod in listing.items:
            member = self._member(pod)
            if member is not None:
                pods[pod.metadata.name] = member
        for name in set(watch.pods) - set(pods):
            self._set(watch, name, None)
        for name, member in pods.items():
            self._set(watch, name, member)
        return str(listing.metadata.resource_version)

    async def _watch(self, core: CoreV1Api, namespace: str, watch: PoolWatch, version: str) -> str:
        """Follow one watch request to its end; returns the resourceVersion to resume from."""
        async with Watch() as stream:
            try:
                async for event in stream.stream(core.list_namespaced_pod, namespace, label_selector=watch.selector,
                                                 resource_version=version, allow_watch_bookmarks=True,
                                                 timeout_seconds=self._watch_timeout_s,
                                                 _request_timeout=self._watch_timeout_s + 30):
                    if event["type"] == "BOOKMARK":
                        continue
                    pod: V1Pod = event["object"]
                    member = None if event["type"] == "DELETED" else self._member(pod)
                    self._set(watch, pod.metadata.name, member)
            except ApiException as e:
                if e.status == 410:
                    raise WatchExpired() from None
                raise
            return str(stream.resource_version or version)

    def _member(self, pod: V1Pod) -> Member | None:
        url = pod_url(pod, self._port)
        if url is None:
            return None
        kind = pod_kind(pod)
        return Member(url, kind) if kind is not None else None

    def _set(self, watch: PoolWatch, name: str, member: Member | None) -> None:
        old = watch.pods.get(name)
        if old == member:
            return
        if old is not None:
            del watch.pods[name]
            if old.url not in self._urls_in_use():
                self._datastore.remove(old.url)
            logger.info("discovery: %s pod %s (%s) left", watch.pool, name, old.url)
        if member is not None:
            watch.pods[name] = member
            self._datastore.add(member.url, watch.pool, kind=member.kind)
            logger.info("discovery: %s %s pod %s ready at %s", watch.pool, member.kind, name, member.url)

    def _urls_in_use(self) -> set[str]:
        return {m.url for w in self._watches for m in w.pods.values()}
