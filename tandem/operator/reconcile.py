"""One idempotent reconcile of an ``LLMDeployment``: apply what ``render`` returns, prune, roll status up.

Children are written with server-side apply under one field manager: the API server merges our fields,
keeps fields other managers own (an HPA's replicas, another controller's annotations), takes back fields a
hand edit changed, and answers an unchanged apply without a new ``resourceVersion``. So running a reconcile
again (from a timer, a child's event, a spec update or an operator restart) is always safe.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tandem.operator.kube import KINDS, ApiError, KubeClient
from tandem.operator.metrics import OperatorMetrics
from tandem.operator.naming import LABEL_DEPLOYMENT, MANAGED_BY, child_name, endpoint_url, selector_string
from tandem.operator.render import render
from tandem.operator.spec import API_VERSION, KIND, SpecError

logger = logging.getLogger(__name__)

# Kinds render() may produce and a reconcile may therefore have to prune when the spec stops asking.
PRUNABLE_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap",
                  "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim")
ROLES = ("prefill", "decode", "router")

# (type "Normal"/"Warning", reason, message) -> posted on the LLMDeployment.
EventSink = Callable[[str, str, str], Awaitable[None] | None]


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


@dataclass
class RoleStatus:
    """Replica counts of one role's Deployment."""

    desired: int
    ready: int
    updated: int
    failed: str | None  # a Deployment condition that says it is stuck, or None

    def as_status(self, selector: str) -> dict[str, Any]:
        return {"replicas": self.desired, "readyReplicas": self.ready, "ready": f"{self.ready}/{self.desired}",
                "selector": selector}


class Reconciler:
    """Reconciles ``LLMDeployment`` objects through a :class:`KubeClient`; one per operator."""

    def __init__(self, client: KubeClient, metrics: OperatorMetrics,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)):
        self.client = client
        self.metrics = metrics
        self.clock = clock
        # NOTE: one lock per object: a timer, a child's event and a spec update may all fire at once.
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Objects with a reconcile queued on the lock; it reads the object afresh, so later triggers can skip.
        self._queued: set[tuple[str, str]] = set()
        self._known: set[tuple[str, str]] = set()

    def known(self) -> list[tuple[str, str]]:
        """(namespace, name) of every object reconciled so far and not seen gone (the resync set)."""
        return sorted(self._known)

    def forget(self, namespace: str, name: str) -> None:
        """Drop per-object state once the object is gone."""
        self._locks.pop((namespace, name), None)
        self._known.discard((namespace, name))

    async def reconcile(self, namespace: str, name: str, *, trigger: str,
                        events_for: Callable[[Mapping[str, Any]], EventSink]) -> dict[str, Any] | None:
        """Apply, prune and roll status up for one object; returns the status written, or None if skipped.

        The object is read afresh under its lock: a trigger's own copy may be older than the last one
        handled. Raises :class:`ApiError` on API failures (after posting a Warning event).
        """
        key = (namespace, name)
        if key in self._queued:
            return None  # a reconcile is already waiting and will see the latest state
        self._queued.add(key)
        try:
            lock = self._locks.setdefault(key, asyncio.Lock())
            await lock.acquire()
        finally:
            self._queued.discard(key)
        try:
            body = await self.client.get(API_VERSION, KIND, namespace, name)
            if body is None:
                self._known.discard(key)
                if key not in self._queued:
                    self._locks.pop(key, None)
                return None  # gone: the garbage collector takes the children
            self._known.add(key)
            if body["metadata"].get("deletionTimestamp"):
                return None
            events = events_for(body)
            started = time.perf_counter()
            try:
                status = await self._reconcile(body, events)
            except ApiError as e:
                self.metrics.reconciles.labels(trigger=trigger, result="error").inc()
                self.metrics.errors.labels(reason=e.reason or str(e.status)).inc()
                await _emit(events, "Warning", "ReconcileFailed", str(e))
                try:
                    await self._write_status(body, {"phase": "Degraded",
                                                    "observedGeneration": body["metadata"].get("generation")},
                                             degraded=("ApiError", str(e)))
                except ApiError:
                    logger.warning("could not record the failure in %s/%s's status", namespace, name)
                raise
            finally:
                self.metrics.duration.observe(time.perf_counter() - started)
            result = "invalid" if status.get("phase") == "Invalid" else "ok"
            self.metrics.reconciles.labels(trigger=trigger, result=result).inc()
            if result == "invalid":
                self.metrics.errors.labels(reason="InvalidSpec").inc()
            return status
        finally:
            lock.release()

    async def _reconcile(self, body: Mapping[str, Any], events: EventSink) -> dict[str, Any]:
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        try:
            manifests = render(body)
        except SpecError as e:
            if not _already_reported(body, str(e)):
                await _emit(events, "Warning", "InvalidSpec", str(e))
            return await self._write_status(body, {"phase": "Invalid", "observedGeneration": meta.get("generation")},
                                            degraded=("InvalidSpec", str(e)), ready=("InvalidSpec", str(e)))
        # NOTE: the mode is read off what render produced (a prefill pool or not): the spec is parsed once.
        disaggregated = any(m["kind"] == "Deployment" and m["metadata"]["name"] == child_name(name, "prefill")
                            for m in manifests)

        problems: list[tuple[str, str]] = []
        changed = False
        for manifest in manifests:
            try:
                action = await self._apply(manifest, uid)
            except ApiError as e:
                what = f"{manifest['kind']} {manifest['metadata']['name']}"
                problems.append(("ApplyFailed", f"{what}: {e}"))
                await _emit(events, "Warning", "ApplyFailed", f"{what}: {e}")
                continue
            if action == "conflict":
                what = f"{manifest['kind']} {manifest['metadata']['name']}"
                message = f"{what} exists and is not owned by this LLMDeployment"
                problems.append(("OwnershipConflict", message))
                if not _already_reported(body, message):
                    await _emit(events, "Warning", "OwnershipConflict", f"{message}; left alone")
            elif action in ("created", "updated"):
                changed = True
                self.metrics.child_actions.labels(kind=manifest["kind"], action=action).inc()
                await _emit(events, "Normal", action.capitalize(), f"{manifest['kind']} {manifest['metadata']['name']}")
        changed |= await self._prune(name, namespace, uid, manifests, events)

        roles = ["prefill", "decode", "router"] if disaggregated else ["decode", "router"]
        role_status = {role: await self._role_status(namespace, child_name(name, role)) for role in roles}
        status: dict[str, Any] = {
            "mode": "disaggregated" if disaggregated else "aggregated",
            "endpoint": endpoint_url(name, namespace),
            "observedGeneration": meta.get("generation"),
        }
        for role, rs in role_status.items():
            status[role] = rs.as_status(selector_string(name, role))
        if not disaggregated:
            status["prefill"] = None  # merge-patch removal of a previous disaggregated status

        stuck = [f"{role}: {rs.failed}" for role, rs in role_status.items() if rs.failed]
        if stuck:
            problems.append(("DeploymentFailed", "; ".join(stuck)))
        not_ready = [f"{role} {rs.ready}/{rs.desired}" for role, rs in role_status.items()
                     if rs.ready < rs.desired or (role in ("router", "decode") and rs.desired < 1)]
        rolling = changed or any(rs.updated < rs.desired or rs.ready < rs.desired for rs in role_status.values())
        if problems:
            status["phase"] = "Degraded"
        elif not not_ready:
            status["phase"] = "Ready"
        else:
            status["phase"] = "Progressing"
        return await self._write_status(
            body, status,
            degraded=(problems[0][0], "; ".join(p[1] for p in problems)) if problems else None,
            ready=("ReplicasNotReady", "not ready: " + ", ".join(not_ready)) if not_ready else None,
            progressing=("RollingOut", "children changed or replicas not yet updated") if rolling else None,
            events=events,
        )

    async def _apply(self, desired: Mapping[str, Any], uid: str) -> str:
        """Server-side apply one child; returns created/updated/unchanged/conflict.

        NOTE: an object of the same name that this LLMDeployment does not own is left alone ("conflict"):
        a forced apply would take it over. The apply then only merges; whether it changed anything shows in
        the ``resourceVersion`` (an apply that changes nothing keeps it).
        """
        meta = desired["metadata"]
        live = await self.client.get(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
        if live is not None:
            if not _owned_by(live, uid):
                return "conflict"
            if live["metadata"].get("deletionTimestamp"):
                return "unchanged"  # being deleted; the next reconcile recreates it
        applied = await self.client.apply(desired, force=True)
        if live is None:
            return "created"
        before = live["metadata"].get("resourceVersion")
        return "unchanged" if applied["metadata"].get("resourceVersion") == before else "updated"

    async def _prune(self, name: str, namespace: str, uid: str, manifests: list[dict[str, Any]],
                     events: EventSink) -> bool:
        """Delete children the spec no longer asks for (a prefill pool, an HPA, the managed Redis)."""
        wanted = {(m["kind"], m["metadata"]["name"]) for m in manifests}
        selector = f"{LABEL_DEPLOYMENT}={name},app.kubernetes.io/managed-by={MANAGED_BY}"
        pruned = False
        for kind in PRUNABLE_KINDS:
            api_version = KINDS[kind][0]
            for live in await self.client.list(api_version, kind, namespace, label_selector=selector):
                child = live["metadata"]["name"]
                if (kind, child) in wanted or not _owned_by(live, uid):
                    continue
                await self.client.delete(api_version, kind, namespace, child)
                self.metrics.child_actions.labels(kind=kind, action="deleted").inc()
                await _emit(events, "Normal", "Deleted", f"{kind} {child} (no longer in the spec)")
                pruned = True
        return pruned

    async def _role_status(self, namespace: str, deployment: str) -> RoleStatus:
        live = await self.client.get("apps/v1", "Deployment", namespace, deployment)
        if live is None:
            return RoleStatus(desired=0, ready=0, updated=0, failed=None)
        st = live.get("status") or {}
        failed = None
        for cond in st.get("conditions") or []:
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                failed = f"{cond.get('reason')}: {cond.get('message', '')}".strip()
            if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
                failed = f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip()
        desired = int((live.get("spec") or {}).get("replicas", 1))
        return RoleStatus(desired=desired, ready=int(st.get("readyReplicas") or 0),
                          updated=int(st.get("updatedReplicas") or 0), failed=failed)

    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any], *,
                            degraded: tuple[str, str] | None = None, ready: tuple[str, str] | None = None,
                            progressing: tuple[str, str] | None = None,
                            events: EventSink | None = None) -> dict[str, Any]:
        """Set conditions (keeping transition times of unchanged ones) and patch status if anything moved."""
        meta = body["metadata"]
        old = dict(body.get("status") or {})
        old_conditions = {c.get("type"): c for c in old.get("conditions") or []}
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        generation = meta.get("generation")

        def condition(ctype: str, true: bool, reason: str, message: str) -> dict[str, Any]:
            prev = old_conditions.get(ctype) or {}
            value = "True" if true else "False"
            return {"type": ctype, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": prev.get("lastTransitionTime", now) if prev.get("status") == value else now,
                    "observedGeneration": generation}

        status["conditions"] = [
            condition("Ready", ready is None and degraded is None,
                      *(ready or degraded or ("AllReplicasReady", "every role has all replicas ready"))),
            condition("Progressing", progressing is not None, *(progressing or ("Complete", "rollout complete"))),
            condition("Degraded", degraded is not None, *(degraded or ("AsExpected", "no problems"))),
        ]
        comparable = {k: v for k, v in status.items() if v is not None}
        if all(old.get(k) == v for k, v in comparable.items()) and all(
                old.get(k) is None for k, v in status.items() if v is None):
            return old
        if events is not None and old.get("phase") != status.get("phase"):
            await _emit(events, "Normal" if status["phase"] in ("Ready", "Progressing") else "Warning",
                        f"Phase{status['phase']}", f"phase {old.get('phase') or '(none)'} -> {status['phase']}")
        await self.client.patch_status(API_VERSION, KIND, meta["namespace"], meta["name"], status)
        return {k: v for k, v in {**old, **status}.items() if v is not None}


def _already_reported(body: Mapping[str, Any], message: str) -> bool:
    """Whether the current Degraded condition already says ``message`` (no repeated Warning every resync)."""
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Degraded" and cond.get("status") == "True" and message in cond.get("message", ""):
            return True
    return False


async def _emit(events: EventSink, type_: str, reason: str, message: str) -> None:
    result = events(type_, reason, message)
    if result is not None:
        await result
