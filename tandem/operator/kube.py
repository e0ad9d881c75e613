"""The operator's calls to the Kubernetes API, on ``kubernetes_asyncio``'s dynamic client.

kopf keeps its own connection for watching; this client reads and lists children, applies them with
server-side apply under one field manager, deletes the ones the spec no longer asks for, and patches the
``LLMDeployment`` status subresource. Objects travel as plain dicts (what ``render`` returns); resources are
found through the API server's discovery, so a kind the server does not serve is a clear error.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.dynamic import DynamicClient
from kubernetes_asyncio.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from kubernetes_asyncio.dynamic.resource import Resource

from tandem.kube import KubeConnection
from tandem.operator.spec import API_VERSION, KIND, PLURAL

FIELD_MANAGER = "tandem-operator"

# kind -> (apiVersion, plural): every kind the operator reads or writes (the chart's RBAC must cover them).
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "Deployment": ("apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    KIND: (API_VERSION, PLURAL),
}


class ApiError(Exception):
    """A non-2xx answer from the API server, with its ``Status`` reason and message."""

    def __init__(self, status: int, reason: str, message: str):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}")


class NotFound(ApiError):
    """404: the object (or the resource) does not exist."""


class Conflict(ApiError):
    """409: a stale ``resourceVersion``, a create of a name that exists, or an apply meeting another
    manager's fields without ``force``."""


def _status_error(status: int, reason: str, body: Any) -> ApiError:
    """Our error for a failed call: the ``Status`` body's reason and message when it has one."""
    message = ""
    if isinstance(body, Mapping):
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    cls = NotFound if status == 404 else Conflict if status == 409 else ApiError
    return cls(status, reason, message or str(body or "")[:200])


def _as_api_error(e: ApiException) -> ApiError:
    try:
        body = json.loads(e.body) if e.body else None
    except (TypeError, ValueError):
        body = e.body
    return _status_error(int(e.status or 0), str(e.reason or ""), body)


async def _json(response: Any) -> dict[str, Any]:
    """The body of a raw response as the API server's JSON (dicts, not the library's wrappers).

    NOTE: the dynamic client asks for unparsed responses, and the library checks the HTTP status only of
    parsed ones: a 4xx/5xx would come back as a ``Status`` body, so it is turned into an error here.
    """
    async with response:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = None
        if response.status >= 400:
            raise _status_error(response.status, str(response.reason or ""), body)
    return body if isinstance(body, dict) else {}


class KubeClient:
    """Async client for the calls the operator makes; raises :class:`ApiError` subclasses.

    ``reconnect``, when given, is called once after a 401 to build a fresh connection and the call is
    retried: a kubeconfig's exec plugin or OIDC token expires while the operator runs (in-cluster tokens are
    re-read by the library itself). NOTE: the dynamic client is created on first use, since its discovery
    needs a running event loop; it caches discovery in a file, kept in a directory of this client's own.
    """

    def __init__(self, connection: KubeConnection, *, timeout: float = 10.0,
                 field_manager: str = FIELD_MANAGER,
                 reconnect: Callable[[], Awaitable[KubeConnection]] | None = None):
        self.connection = connection
        self.field_manager = field_manager
        self._timeout = timeout
        self._reconnect = reconnect
        self._discovery_dir: tempfile.TemporaryDirectory[str] | None = None
        # NOTE: reconciles of several objects share this client: one of them opens or renews it at a time.
        self._opening = asyncio.Lock()
        self._api: ApiClient | None = None
        self._dynamic: DynamicClient | None = None
        self._resources: dict[tuple[str, str], Resource] = {}

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._api is not None:
            await self._api.close()
            self._api = self._dynamic = None
            self._resources.clear()
        if self._discovery_dir is not None:
            self._discovery_dir.cleanup()
            self._discovery_dir = None

    async def _open(self) -> DynamicClient:
        api = self.connection.api_client(self.field_manager)
        self._discovery_dir = self._discovery_dir or tempfile.TemporaryDirectory(prefix="tandem-discovery-")
        dynamic = DynamicClient(api, cache_file=f"{self._discovery_dir.name}/discovery.json")
        try:
            # NOTE: discovery reads answers without checking their status (a 401 would look like an API
            # with no resources), so one checked request goes first.
            await _json(await dynamic.request("get", "/apis", serialize=False, _request_timeout=self._timeout))
            dynamic = await dynamic
        except BaseException as e:
            await api.close()
            if isinstance(e, ApiException):
                raise _as_api_error(e) from None
            raise
        self._api = api
        return dynamic

    async def _resource(self, api_version: str, kind: str) -> tuple[DynamicClient, Resource]:
        if self._dynamic is None:
            async with self._opening:
                if self._dynamic is None:
                    self._dynamic = await self._open()
        key = (api_version, kind)
        if key not in self._resources:
            try:
                self._resources[key] = await self._dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                raise NotFound(404, "NotFound", f"the server does not serve {kind} in {api_version}") from None
            except ApiException as e:
                raise _as_api_error(e) from None
        return self._dynamic, self._resources[key]

    async def _call(self, api_version: str, kind: str, verb: str, *args: Any, subresource: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        refused = self.connection
        try:
            return await self._call_once(api_version, kind, verb, *args, subresource=subresource, **kwargs)
        except ApiError as e:
            if e.status != 401 or self._reconnect is None:
                raise
        async with self._opening:
            if self.connection is refused:  # not already renewed by a concurrent call
                await self.aclose()
                self.connection = await self._reconnect()
        return await self._call_once(api_version, kind, verb, *args, subresource=subresource, **kwargs)

    async def _call_once(self, api_version: str, kind: str, verb: str, *args: Any, subresource: str | None,
                         **kwargs: Any) -> dict[str, Any]:
        dynamic, resource = await self._resource(api_version, kind)
        target = resource if subresource is None else getattr(resource, subresource)
        return await self._send(getattr(dynamic, verb), target, *args, **kwargs)

    async def _send(self, method: Any, resource: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await method(resource, *args, serialize=False, _request_timeout=self._timeout, **kwargs)
        except (DynamicApiError, ApiException) as e:
            raise _as_api_error(e) from None
        return await _json(response)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call(api_version, kind, "get", name=name, namespace=namespace)
        except NotFound:
            return None

    async def list(self, api_version: str, kind: str, namespace: str,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace, optionally filtered by a label selector."""
        result = await self._call(api_version, kind, "get", namespace=namespace, label_selector=label_selector)
        return list(result.get("items") or [])

    async def apply(self, obj: Mapping[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply: create the object or merge these fields into it, owned by our field manager.

        ``force`` takes over fields another manager set to other values (a hand edit), as controllers do;
        without it such a field is a :class:`Conflict`.
        """
        meta = obj["metadata"]
        return await self._call(obj["apiVersion"], obj["kind"], "server_side_apply", body=dict(obj),
                                name=meta["name"], namespace=meta.get("namespace"),
                                field_manager=self.field_manager, force_conflicts=force)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST a new object."""
        meta = obj["metadata"]
        return await self._call(obj["apiVersion"], obj["kind"], "create", body=dict(obj),
                                namespace=meta.get("namespace"), field_manager=self.field_manager)

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT a whole object; its ``metadata.resourceVersion`` makes a stale write fail with 409."""
        meta = obj["metadata"]
        return await self._call(obj["apiVersion"], obj["kind"], "replace", body=dict(obj), name=meta["name"],
                                namespace=meta.get("namespace"), field_manager=self.field_manager)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete an object in the background (dependents are garbage-collected); a missing one is fine."""
        try:
            await self._call(api_version, kind, "delete", name=name, namespace=namespace,
                             propagation_policy="Background")
        except NotFound:
            return  # already gone: deleting is idempotent

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource (``None`` values remove fields)."""
        return await self._call(api_version, kind, "patch", subresource="status", body={"status": dict(status)},
                                name=name, namespace=namespace, content_type="application/merge-patch+json",
                                field_manager=self.field_manager)
