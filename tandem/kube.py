"""Connecting to the Kubernetes API, once for the operator and the router, through ``kubernetes_asyncio``.

The library reads kubeconfigs (token, client certificate, ``exec`` credential plugins, the ``oidc``
auth-provider with refresh) and in-cluster service accounts (with token rotation). This module only picks
the source and remembers the default namespace, which the library does not expose. Torch-free: the router
imports it.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import kubernetes_asyncio
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException

_VERSION = importlib.metadata.version("tandem")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = "~/.kube/config"


class KubeConfigError(Exception):
    """No usable way to reach the API server (one line that says what was tried)."""


@dataclass(frozen=True, slots=True)
class KubeConnection:
    """A ready ``kubernetes_asyncio`` configuration and the namespace its source names (if any)."""

    configuration: Configuration
    default_namespace: str | None = None

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self.configuration.host)

    def api_client(self, component: str) -> ApiClient:
        """A new API client (an aiohttp session) over this connection, whose User-Agent names ``component``
        (API server audit logs and managedFields show who wrote); close it with ``await .close()``."""
        client = ApiClient(configuration=self.configuration)
        client.user_agent = f"{component}/{_VERSION} kubernetes_asyncio/{kubernetes_asyncio.__version__}"
        return client

    def bearer_token(self) -> str | None:
        """The token the library sends as ``Authorization: Bearer``, without the prefix; None when none."""
        value = self.configuration.api_key.get("BearerToken")
        if not value:
            return None
        scheme, _, token = str(value).partition(" ")
        return token if scheme.lower() == "bearer" and token else None


def plain(server: str, default_namespace: str | None = None) -> KubeConnection:
    """An API server reached without credentials (``kubectl proxy``, a local test server)."""
    return KubeConnection(Configuration(host=server.rstrip("/")), default_namespace)


def in_cluster(service_account_dir: Path = SERVICE_ACCOUNT_DIR,
               environ: Mapping[str, str] = os.environ) -> KubeConnection:
    """The pod's service account: ``KUBERNETES_SERVICE_HOST``/``_PORT``, its token (re-read as it rotates)
    and CA. Raises :class:`KubeConfigError` outside a cluster."""
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(
            client_configuration=configuration, environ=environ,
            token_filename=str(service_account_dir / "token"), cert_filename=str(service_account_dir / "ca.crt"))
    except ConfigException as e:
        raise KubeConfigError(f"not running in a cluster ({e})") from None
    namespace_file = service_account_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    return KubeConnection(configuration, namespace or None)


async def from_kubeconfig(path: str | os.PathLike[str] | None = None, context: str | None = None) -> KubeConnection:
    """The current (or named) context of a kubeconfig (``$KUBECONFIG``'s first file, else ~/.kube/config).

    Runs an ``exec`` credential plugin or refreshes an ``oidc`` token when the user entry says so.
    """
    path = Path(path or os.environ.get("KUBECONFIG", DEFAULT_KUBECONFIG).split(os.pathsep)[0]).expanduser()
    if not path.exists():
        raise KubeConfigError(f"no kubeconfig at {path} and not running in a cluster")
    configuration = Configuration()
    try:
        loader = await kube_config.load_kube_config(config_file=str(path), context=context,
                                                    client_configuration=configuration, persist_config=False)
    except ConfigException as e:
        raise KubeConfigError(f"kubeconfig {path}: {e}") from None
    except (TypeError, KeyError, ValueError) as e:  # the library's own reading of a malformed entry
        raise KubeConfigError(f"kubeconfig {path}: cannot use context {context or '(current)'}: "
                              f"{type(e).__name__}: {e}") from None
    namespace = (loader.current_context.get("context") or {}).get("namespace")
    return KubeConnection(configuration, namespace or None)


async def connect(*, server: str | None = None, kubeconfig: str | os.PathLike[str] | None = None,
                  context: str | None = None, service_account_dir: Path = SERVICE_ACCOUNT_DIR,
                  environ: Mapping[str, str] = os.environ) -> KubeConnection:
    """The connection a command line asks for: ``server`` (no credentials), else an explicit kubeconfig or
    context, else the in-cluster service account when running in a pod, else the default kubeconfig."""
    if server:
        return plain(server)
    if kubeconfig or context:
        return await from_kubeconfig(kubeconfig, context)
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(service_account_dir, environ)
    return await from_kubeconfig()
