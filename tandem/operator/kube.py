"""A small async Kubernetes REST client for the operator's own calls (kopf keeps its own for watching).

It speaks plain JSON over httpx, so it needs no generated client: the operator only gets, lists, creates,
replaces and deletes the handful of kinds :func:`tandem.operator.render.render` produces, and patches the
``LLMDeployment`` status subresource.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tandem.operator.spec import API_VERSION, KIND, PLURAL

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# kind -> (apiVersion, plural): every kind the operator reads or writes.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "ServiceAccount": ("v1", "serviceaccounts"),
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
    """409: a stale ``resourceVersion`` on update, or a create of a name that exists."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    insecure: bool = False
    default_namespace: str | None = None

    @classmethod
    def in_cluster(cls) -> Credentials | None:
        """The pod's service account, when running inside a cluster."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        token_file = SERVICE_ACCOUNT_DIR / "token"
        if not host or not port or not token_file.exists():
            return None
        ns_file = SERVICE_ACCOUNT_DIR / "namespace"
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            token=token_file.read_text().strip(),
            ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
            default_namespace=ns_file.read_text().strip() if ns_file.exists() else None,
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> Credentials:
        """The current (or named) context of a kubeconfig: token or client-certificate users."""
        path = Path(path or os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no kubeconfig at {path} and not running in a cluster")
        config = yaml.safe_load(path.read_text()) or {}
        context_name = context or config.get("current-context")
        ctx = _named(config.get("contexts", []), context_name, "context")
        cluster = _named(config.get("clusters", []), ctx.get("cluster"), "cluster")
        user = _named(config.get("users", []), ctx.get("user"), "user") if ctx.get("user") else {}
        return cls(
            server=cluster["server"],
            token=user.get("token"),
            ca_path=cluster.get("certificate-authority") or _spill(cluster.get("certificate-authority-data")),
            client_cert_path=user.get("client-certificate") or _spill(user.get("client-certificate-data")),
            client_key_path=user.get("client-key") or _spill(user.get("client-key-data")),
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            default_namespace=ctx.get("namespace"),
        )

    @classmethod
    def discover(cls) -> Credentials:
        """In-cluster service account first, then the kubeconfig."""
        return cls.in_cluster() or cls.from_kubeconfig()


def _named(items: list[dict[str, Any]], name: str | None, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return dict(item.get(what) or {})
    raise ValueError(f"kubeconfig has no {what} named {name!r}")


def _spill(data: str | None) -> str | None:
    """kubeconfig ``*-data`` fields are base64 PEM; httpx/ssl want files."""
    if not data:
        return None
    fd, path = tempfile.mkstemp(prefix="tandem-kube-", suffix=".pem")
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data))
    return path


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    """The REST path of a collection or an object, e.g. ``/apis/apps/v1/namespaces/ns/deployments/x``."""
    if kind not in KINDS:
        raise ValueError(f"unsupported kind {kind!r}")
    plural = KINDS[kind][1]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class KubeClient:
    """Async JSON client for the calls the operator makes; raises :class:`ApiError` subclasses."""

    def __init__(self, credentials: Credentials, *, timeout: float = 10.0):
        self.credentials = credentials
        verify: ssl.SSLContext | bool = False if credentials.insecure else True
        if credentials.ca_path and not credentials.insecure:
            verify = ssl.create_default_context(cafile=credentials.ca_path)
        if credentials.client_cert_path and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(credentials.client_cert_path, credentials.client_key_path)
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        self._http = httpx.AsyncClient(base_url=credentials.server, headers=headers, verify=verify, timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _call(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        response = await self._http.request(method, path, params=params, json=body,
                                            headers={"Content-Type": content_type} if body is not None else None)
        if response.status_code >= 400:
            try:
                status = response.json()
            except ValueError:
                status = {}
            reason = str(status.get("reason") or response.reason_phrase)
            message = str(status.get("message") or response.text[:200])
            cls = NotFound if response.status_code == 404 else Conflict if response.status_code == 409 else ApiError
            raise cls(response.status_code, reason, message)
        return response.json() if response.content else {}

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", resource_path(api_version, kind, namespace, name))
        except NotFound:
            return None

    async def list(self, api_version: str, kind: str, namespace: str,
                   label_selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace, optionally filtered by a label selector."""
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._call("GET", resource_path(api_version, kind, namespace), params=params)
        return list(result.get("items") or [])

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST a new object."""
        meta = obj["metadata"]
        if not meta.get("namespace"):
            raise ValueError(f"{obj['kind']} {meta.get('name')!r}: metadata.namespace is required")
        return await self._call("POST", resource_path(obj["apiVersion"], obj["kind"], meta["namespace"]),
                                body=dict(obj))

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT a whole object; its ``metadata.resourceVersion`` makes a stale write fail with 409."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return await self._call("PUT", path, body=dict(obj))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete an object in the background (dependents are garbage-collected); a missing one is fine."""
        try:
            await self._call("DELETE", resource_path(api_version, kind, namespace, name),
                             body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        except NotFound:
            return  # already gone: deleting is idempotent

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource."""
        return await self._call("PATCH", resource_path(api_version, kind, namespace, name, "status"),
                                body={"status": dict(status)}, content_type="application/merge-patch+json")
