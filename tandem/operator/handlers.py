"""kopf handlers for ``LLMDeployment``: thin wrappers that call :class:`Reconciler` and post events.

Handlers go into an explicit :class:`kopf.OperatorRegistry` built per operator (no module-level
decorators, so importing this module registers nothing and tests can run several operators).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from tandem.kube import KubeConnection
from tandem.operator.kube import KINDS, KubeClient
from tandem.operator.reconcile import PRUNABLE_KINDS, EventSink, Reconciler
from tandem.operator.naming import MANAGED_BY
from tandem.operator.spec import GROUP, KIND, PLURAL, VERSION

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    """Timings of the operator; tests shorten them to run in seconds."""

    resync_seconds: float = 30.0  # the timer that repairs drift nobody told us about and refreshes status
    watch_server_timeout: float | None = 300.0
    retry_delay: float = 5.0  # after a failed create/update reconcile
    configure: Callable[[kopf.OperatorSettings], None] | None = None  # extra settings (tests)


def event_sink(body: Mapping[str, Any]) -> EventSink:
    """Events posted on ``body`` through kopf's poster (batched, never failing the handler)."""

    def post(type_: str, reason: str, message: str) -> None:
        kopf.event(dict(body), type=type_, reason=reason, message=message)

    return post


def connection_info(connection: KubeConnection) -> kopf.ConnectionInfo:
    """kopf's login for the API server and credentials the operator's own client uses."""
    configuration = connection.configuration
    scheme, _, token = str(configuration.api_key.get("BearerToken") or "").partition(" ")
    return kopf.ConnectionInfo(
        server=connection.server,
        scheme=scheme or None,
        token=token or None,
        ca_path=configuration.ssl_ca_cert,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        insecure=not configuration.verify_ssl,
        default_namespace=connection.default_namespace,
    )


def build_registry(connect: Callable[[], Awaitable[KubeConnection]], reconciler: Reconciler,
                   options: OperatorOptions = OperatorOptions()) -> kopf.OperatorRegistry:
    """A kopf registry with every handler of the operator, bound to ``reconciler``.

    ``connect`` is called at every kopf login: kopf logs in again when the API server answers 401, and a
    fresh connection re-runs a kubeconfig's exec plugin or re-reads a rotated service-account token.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(await connect())

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our status schema has no room for kopf's bookkeeping: keep it in annotations under our domain.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.posting.reporting_component = "tandem-operator"
        settings.posting.event_name_prefix = "tandem-"
        settings.watching.server_timeout = options.watch_server_timeout
        if options.configure is not None:
            options.configure(settings)

    async def reconcile(namespace: str, name: str, trigger: str) -> None:
        try:
            await reconciler.reconcile(namespace, name, trigger=trigger, events_for=event_sink)
        except Exception as e:  # noqa: BLE001 - the reconciler already posted a Warning event
            raise kopf.TemporaryError(f"reconcile failed: {e}", delay=options.retry_delay) from e

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def on_change(namespace: str, name: str, reason: str, **_: Any) -> None:
        await reconcile(namespace, name, trigger=str(reason))

    # One resync loop for the whole operator instead of a kopf timer per object: kopf guards timers with a
    # finalizer, which would leave every LLMDeployment undeletable while the operator is down.
    background: dict[str, asyncio.Task[None]] = {}

    async def resync_forever() -> None:
        while True:
            await asyncio.sleep(options.resync_seconds)
            for namespace, name in reconciler.known():
                try:
                    await reconciler.reconcile(namespace, name, trigger="resync", events_for=event_sink)
                except Exception:  # noqa: BLE001 - posted as an event; the next round retries
                    logger.exception("resync of %s/%s failed", namespace, name)

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        background["resync"] = asyncio.create_task(resync_forever(), name="tandem-resync")

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        task = background.pop("resync", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, registry=registry)
    def on_delete(namespace: str, name: str, **_: Any) -> None:
        # NOTE: optional, so no finalizer: children carry owner references and the garbage collector
        # removes them even when the operator is not running.
        reconciler.forget(namespace, name)

    async def on_child_event(type: str | None, body: kopf.Body, **_: Any) -> None:
        # The initial listing (type None) is covered by the resume handler of every parent.
        if type is None:
            return
        namespace = body.get("metadata", {}).get("namespace")
        for ref in body.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") != KIND or not ref.get("apiVersion", "").startswith(f"{GROUP}/"):
                continue
            try:
                await reconciler.reconcile(namespace, ref["name"], trigger="child", events_for=event_sink)
            except Exception:  # noqa: BLE001 - the parent's own timer retries; the event was posted
                logger.exception("reconcile of %s/%s after a child event failed", namespace, ref["name"])

    # Children edited or deleted by hand come back at once (and status follows their readiness).
    for kind in PRUNABLE_KINDS:
        api_version, plural = KINDS[kind]
        group, _, version = api_version.rpartition("/")
        kopf.on.event(group, version, plural, labels={"app.kubernetes.io/managed-by": MANAGED_BY},
                      id=f"child-{plural}", registry=registry)(on_child_event)
    return registry


def make_client(connection: KubeConnection,
                reconnect: Callable[[], Awaitable[KubeConnection]] | None = None) -> KubeClient:
    """The operator's client for the same API server kopf logs into (``reconnect`` after a 401)."""
    return KubeClient(connection, reconnect=reconnect)
