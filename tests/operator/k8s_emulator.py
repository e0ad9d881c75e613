"""A Kubernetes API emulator for operator tests: kmock's ``KubernetesEmulator`` plus what a real API server does.

kmock (by kopf's author) gives the HTTP server, request parsing, discovery and error rendering; its own
storage merges dicts and streams every object on every watch. This subclass replaces the storage with one
that behaves like the API server as far as an operator can tell:

- CRD defaulting (structural ``default`` values; no schema or CEL validation, so tests can also see
  what the operator does with an object a CEL-less cluster let through);
- ``uid``, ``resourceVersion`` (one global counter), ``generation`` (bumped only by spec changes),
  ``creationTimestamp``, ``generateName``;
- list ``resourceVersion`` and watch *from* a resourceVersion (only later events replay), ``timeoutSeconds``,
  410 Expired for a watch from before a :meth:`compact`;
- status subresource isolation (the main resource ignores ``status``; ``/status`` changes only ``status``);
- 409 on a stale ``resourceVersion`` (PUT or patch) and on creating an existing name;
- JSON merge patch (``null`` deletes) and PUT replace; no-op writes bump nothing;
- server-side apply (``PATCH`` with ``application/apply-patch+yaml``, ``fieldManager``, ``force``): create if
  absent, merge, ``managedFields`` per manager, 409 on another manager's field (see ``managed_fields``);
  every other write records its manager's changed fields (``fieldManager``, else the User-Agent's product);
- equality- and set-based label selectors on list and watch;
- finalizers (``deletionTimestamp`` first), owner-reference garbage collection (background cascade);
- the scale subresource of custom resources;
- bearer-token authentication when ``accepted_tokens`` is set (401 otherwise);
- the Namespace objects themselves (``/api/v1/namespaces`` and ``/api/v1/namespaces/NAME``), which kopf lists
  and watches when it serves chosen namespaces.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import parsing, rendering

import managed_fields
from crd_schema import apply_defaults

# The resources every test server knows: (group, version, plural, kind, namespaced, subresources).
BUILTIN_RESOURCES = [
    ("", "v1", "configmaps", "ConfigMap", True, ()),
    ("", "v1", "services", "Service", True, ("status",)),
    ("", "v1", "serviceaccounts", "ServiceAccount", True, ()),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("status",)),
    ("", "v1", "pods", "Pod", True, ("status",)),
    ("", "v1", "events", "Event", True, ()),
    ("", "v1", "namespaces", "Namespace", False, ("status",)),
    ("apps", "v1", "deployments", "Deployment", True, ("status", "scale")),
    ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("status",)),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("status",)),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", True, ()),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, ()),
]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _parse_path(path: str, _kmock_parse=parsing.parse_path) -> parsing.ParsedPath:
    """kmock's path parser, plus the Namespace resource's own paths.

    NOTE: kmock reads ``/api/v1/namespaces/X/...`` as "in namespace X" and fails on the bare collection
    ``/api/v1/namespaces`` (a 500 from its parser), so an operator scoped to namespaces, which lists and
    watches them, could not start against it. Here the collection and ``/api/v1/namespaces/NAME`` (with an
    optional subresource such as ``status``) are the cluster-scoped ``namespaces`` resource, as on a real API
    server; every other path goes to kmock unchanged.
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4, 5) and not (
            len(parts) == 5 and parts[4] not in ("status", "finalize")):
        name = parts[3] if len(parts) > 3 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, parts[4] if len(parts) == 5 else None)
    return _kmock_parse(path)


parsing.parse_path = _parse_path  # rendering.Request._parse looks it up at every request


def _guess_k8s(path: parsing.ParsedPath | None, method: Any, query: Mapping[str, str],
               _kmock_guess=parsing.guess_k8s) -> Any:
    """kmock's action guess, reading ``watch`` as the API server parses booleans (Go's ``ParseBool``).

    NOTE: kmock takes only ``watch=true`` for a watch; kubernetes_asyncio sends ``watch=True``, which a
    real API server watches on, and kmock would answer it with a list.
    """
    if query.get("watch") in ("1", "t", "T", "TRUE", "True"):
        query = {**query, "watch": "true"}
    return _kmock_guess(path, method, query)


parsing.guess_k8s = _guess_k8s  # likewise looked up at every request


@dataclass(frozen=True)
class ScaleSpec:
    """Where a custom resource's scale subresource reads and writes (dotted paths as in the CRD)."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None


@dataclass(frozen=True)
class ResourceType:
    """A served resource: identity, kind, scope and subresources."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...]
    scale: ScaleSpec | None = None
    schema: Mapping[str, Any] | None = None  # a CRD's openAPIV3Schema: its defaults are applied

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _manager(request: rendering.Request) -> str:
    """Who writes: ``?fieldManager=``, else the User-Agent's product (``kubectl/v1.31`` -> ``kubectl``)."""
    return request.params.get("fieldManager") or (request.headers.get("User-Agent") or "unknown").split("/")[0]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` removes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_REQUIREMENT = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)?\s*(?P<value>[^\s!=(),]*)\s*$")
_SET_REQUIREMENT = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)\s*$")


def parse_label_selector(selector: str) -> list[tuple[str, str, set[str]]]:
    """``a=b,c!=d,e in (f,g),h notin (i),j,!k`` -> [(key, op, values)]; raises 400 on nonsense."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    requirements = []
    for part in filter(None, (p.strip() for p in parts)):
        if part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", set()))
            continue
        set_based = _SET_REQUIREMENT.match(part)
        if set_based:
            values = {v.strip() for v in set_based.group("values").split(",") if v.strip()}
            requirements.append((set_based.group("key"), set_based.group("op"), values))
            continue
        m = _REQUIREMENT.match(part)
        if not m:
            raise _error(400, "BadRequest", f"unable to parse requirement {part!r}")
        op, value = (m.group("op") or "").strip(), m.group("value")
        if not op:
            if value:
                raise _error(400, "BadRequest", f"unable to parse requirement {part!r}")
            requirements.append((m.group("key"), "exists", set()))
        else:
            requirements.append((m.group("key"), "!=" if op == "!=" else "=", {value}))
    return requirements


def labels_match(labels: Mapping[str, str], requirements: list[tuple[str, str, set[str]]]) -> bool:
    """Whether a label set satisfies every parsed requirement."""
    for key, op, values in requirements:
        present = key in labels
        if op == "exists" and not present or op == "!exists" and present:
            return False
        if op in ("=", "in") and (not present or labels[key] not in values):
            return False
        if op in ("!=", "notin") and present and labels[key] in values:
            return False
    return True


def _get_path(obj: Mapping[str, Any], path: str) -> Any:
    for part in path.strip(".").split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = path.strip(".").split(".")
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with API-server semantics (see the module docstring)."""

    _types: dict[tuple[str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _store: dict[tuple[str, str, str | None, str], dict[str, Any]] = attrs.field(factory=dict, init=False)
    _log: list[tuple[int, tuple[str, str], str, dict[str, Any]]] = attrs.field(factory=list, init=False)
    # Set (and replaced by a fresh one) whenever the log grows. NOTE: not an asyncio.Condition: a watcher
    # waiting on one under asyncio.wait_for must re-acquire its lock when cancelled, and on Python 3.11 five
    # such waiters once re-tried for ever at a test's teardown, hanging it (an Event needs no lock).
    _changed: asyncio.Event | None = attrs.field(default=None, init=False)
    _rv: int = attrs.field(default=100, init=False)
    # History before this resourceVersion is gone (etcd compaction): a watch from older gets 410 Expired.
    _compacted: int = attrs.field(default=0, init=False)
    _state_lock: asyncio.Lock | None = attrs.field(default=None, init=False)
    # When set, only ``Authorization: Bearer <one of these>`` gets in; anything else is 401 (tests swap it to
    # play a token that expired or rotated).
    accepted_tokens: set[str] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # PUT has no kmock action; a replace of an object or of a subresource lands here.
        self.fallback[kmock.method.PUT] << self._serve_replace
        for group, version, plural, kind, namespaced, subresources in BUILTIN_RESOURCES:
            self.add_resource(ResourceType(group, version, plural, kind, namespaced, subresources))

    # ---- set-up -------------------------------------------------------------------------------------------
    def add_resource(self, rtype: ResourceType) -> None:
        """Serve a resource (also in discovery, which kopf reads first)."""
        self._types[(rtype.group, rtype.plural)] = rtype
        self.resources[f"{rtype.api_version}/{rtype.plural}" if rtype.group else f"v1/{rtype.plural}"] = \
            kmock.ResourceInfo(kind=rtype.kind, namespaced=rtype.namespaced, verbs=VERBS,
                               subresources=list(rtype.subresources))

    def add_crd(self, crd: Mapping[str, Any]) -> ResourceType:
        """Serve the storage version of a CustomResourceDefinition manifest."""
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage"))
        subs = version.get("subresources") or {}
        scale = None
        if "scale" in subs:
            s = subs["scale"]
            scale = ScaleSpec(s["specReplicasPath"], s["statusReplicasPath"], s.get("labelSelectorPath"))
        rtype = ResourceType(spec["group"], version["name"], spec["names"]["plural"], spec["names"]["kind"],
                             spec["scope"] == "Namespaced", tuple(subs), scale,
                             (version.get("schema") or {}).get("openAPIV3Schema"))
        self.add_resource(rtype)
        return rtype

    # ---- direct access for assertions ---------------------------------------------------------------------
    def get_object(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A deep copy of a stored object, or None."""
        group = api_version.rpartition("/")[0]
        obj = self._store.get((group, plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Deep copies of every stored object of a resource (in a namespace, or everywhere)."""
        group = api_version.rpartition("/")[0]
        return [copy.deepcopy(o) for (g, p, ns, _), o in sorted(self._store.items(), key=lambda kv: str(kv[0]))
                if g == group and p == plural and (namespace is None or ns == namespace)]

    # ---- plumbing -----------------------------------------------------------------------------------------
    def _change_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _lock_(self) -> asyncio.Lock:
        if self._state_lock is None:
            self._state_lock = asyncio.Lock()
        return self._state_lock

    def _type(self, request: rendering.Request) -> ResourceType:
        res = request.resource
        rtype = self._types.get((res.group or "", res.plural or "")) if res is not None else None
        if rtype is None or rtype.version != res.version:
            raise kmock.KubernetesResourceNotFoundError()
        return rtype

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _record(self, rtype: ResourceType, event_type: str, obj: dict[str, Any]) -> None:
        self._log.append((int(obj["metadata"]["resourceVersion"]), (rtype.group, rtype.plural), event_type,
                          copy.deepcopy(obj)))
        event, self._changed = self._change_event(), asyncio.Event()
        event.set()

    @staticmethod
    def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
        """What bumps ``generation``: everything but metadata and status."""
        return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}

    def _selector(self, request: rendering.Request) -> list[tuple[str, str, set[str]]]:
        return parse_label_selector(request.params.get("labelSelector", ""))

    # ---- handlers (kmock fallbacks; user reactions registered on the emulator still come first) -----------
    async def _handle(self, request: rendering.Request) -> Any:
        if self.accepted_tokens is not None:
            scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
            if scheme != "Bearer" or token not in self.accepted_tokens:
                raise _error(401, "Unauthorized", "Unauthorized")
        # NOTE: skip KubernetesEmulator._handle, which mutates kmock's own store before dispatching.
        return await kmock.KubernetesScaffold._handle(self, request)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        rtype = self._type(request)
        selector = self._selector(request)
        items = [copy.deepcopy(o) for (g, p, ns, _), o in self._store.items()
                 if (g, p) == (rtype.group, rtype.plural) and (request.namespace is None or ns == request.namespace)
                 and labels_match(o["metadata"].get("labels") or {}, selector)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        rtype = self._type(request)
        selector = self._selector(request)
        timeout = float(request.params.get("timeoutSeconds") or 60)
        deadline = asyncio.get_running_loop().time() + timeout
        since = request.params.get("resourceVersion")

        def visible(obj: Mapping[str, Any]) -> bool:
            meta = obj["metadata"]
            return ((request.namespace is None or meta.get("namespace") == request.namespace)
                    and (request.name is None or meta.get("name") == request.name)
                    and labels_match(meta.get("labels") or {}, selector))

        yield b""  # send the headers now, even if nothing happens for a while
        if since in (None, "", "0"):
            # No starting point: synthetic ADDED events for the current state, then changes.
            position = len(self._log)
            for (g, p, _, _), obj in list(self._store.items()):
                if (g, p) == (rtype.group, rtype.plural) and visible(obj):
                    yield {"type": "ADDED", "object": copy.deepcopy(obj)}
        else:
            start = int(since)
            if start < self._compacted:
                # As the API server answers a watch from a compacted version: an ERROR event, then the end.
                yield {"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {start} ({self._compacted})"}}
                return
            position = next((i for i, entry in enumerate(self._log) if entry[0] > start), len(self._log))
        while True:
            while position < len(self._log):
                _, key, event_type, obj = self._log[position]
                position += 1
                if key == (rtype.group, rtype.plural) and visible(obj):
                    yield {"type": event_type, "object": obj}
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            # aiohttp does not cancel a handler whose client went away: look every half second.
            transport = request._raw_request.transport if request._raw_request is not None else None
            if transport is None or transport.is_closing():
                return
            # Taken after the log was read to its end, with no await between: no append can slip past it.
            changed = self._change_event()
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        rtype = self._type(request)
        obj = self._store.get((rtype.group, rtype.plural, request.namespace, request.name))
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError(message=f"{rtype.plural} {request.name!r} not found")
        if request.subresource == "scale":
            return self._scale_of(rtype, obj)
        if request.subresource not in (None, "status"):
            raise kmock.KubernetesNotFoundError()
        return copy.deepcopy(obj)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        rtype = self._type(request)
        body = request.data
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        namespace = request.namespace if rtype.namespaced else None
        if rtype.namespaced and namespace is None:
            raise _error(405, "MethodNotAllowed", f"{rtype.plural} are namespaced: POST to a namespace's URL")
        if rtype.namespaced and meta.get("namespace") not in (None, namespace):
            raise _error(400, "BadRequest", "the namespace of the object does not match the URL")
        async with self._lock_():
            key = (rtype.group, rtype.plural, namespace, meta["name"])
            if key in self._store:
                raise _error(409, "AlreadyExists", f"{rtype.plural} {meta['name']!r} already exists")
            obj["apiVersion"] = rtype.api_version
            meta["managedFields"] = managed_fields.after_update(None, obj, _manager(request), _now())
            created = await self._insert(rtype, key, obj)
        return rendering.Response(status=201, payload=created)

    async def _insert(self, rtype: ResourceType, key: tuple[str, str, str | None, str],
                      obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object with its system fields (the caller holds the lock and checked the name)."""
        meta = obj["metadata"]
        if rtype.namespaced:
            meta["namespace"] = key[2]
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1, creationTimestamp=_now())
        for stale in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(stale, None)
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if "status" in rtype.subresources:
            obj.pop("status", None)  # status is written through /status only
        if rtype.schema is not None:
            obj = apply_defaults(rtype.schema, obj)
        self._store[key] = obj
        await self._record(rtype, "ADDED", obj)
        return copy.deepcopy(obj)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        result = await self._patch(request)
        # NOTE: kmock keeps the status of a returned Response on the (shared) fallback reaction, so once an
        # apply answered 201 Created every later PATCH would too: every PATCH answer names its status.
        return result if isinstance(result, rendering.Response) else rendering.Response(status=200, payload=result)

    async def _patch(self, request: rendering.Request) -> rendering.Payload:
        rtype = self._type(request)
        patch = request.data
        content_type = request.headers.get("Content-Type", "")
        if "application/apply-patch+yaml" in content_type:
            return await self._serve_apply(rtype, request)
        if "application/json-patch+json" in content_type:
            if not isinstance(patch, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations")

            def apply_json_patch(live: dict[str, Any]) -> dict[str, Any]:
                try:
                    return jsonpatch.apply_patch(live, patch)
                except jsonpatch.JsonPatchTestFailed as e:  # kopf's resourceVersion guard lands here
                    raise _error(422, "Invalid", f"the JSON patch test failed: {e}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise _error(422, "Invalid", f"the JSON patch does not apply: {e}") from None

            return await self._write(rtype, request, apply_json_patch, {})
        if "merge-patch+json" not in content_type and "strategic-merge-patch+json" not in content_type:
            raise _error(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
        if not isinstance(patch, Mapping):
            raise _error(400, "BadRequest", "a merge patch must be a JSON object")
        return await self._write(rtype, request, lambda live: merge_patch(live, patch), patch)

    async def _serve_apply(self, rtype: ResourceType, request: rendering.Request) -> rendering.Payload:
        """Server-side apply of the main resource (see ``managed_fields``)."""
        try:
            body = yaml.safe_load(request.text or "")
        except yaml.YAMLError as e:
            raise _error(400, "BadRequest", f"the apply body is not YAML: {e}") from None
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the apply body must be an object")
        manager = request.params.get("fieldManager")
        if not manager:
            raise _error(400, "BadRequest", "fieldManager is required for apply requests")
        force = request.params.get("force", "false").lower() in ("true", "1")
        if request.subresource is not None:
            raise _error(405, "MethodNotAllowed", f"this server applies {rtype.plural} only, not /{request.subresource}")
        if (body.get("apiVersion"), body.get("kind")) != (rtype.api_version, rtype.kind):
            raise _error(400, "BadRequest", f"apiVersion and kind must be {rtype.api_version} and {rtype.kind}, "
                                            f"got {body.get('apiVersion')} and {body.get('kind')}")
        meta = body.get("metadata") or {}
        if meta.get("name") != request.name:
            raise _error(400, "BadRequest", "metadata.name must match the name in the URL")
        if rtype.namespaced and meta.get("namespace") not in (None, request.namespace):
            raise _error(400, "BadRequest", "metadata.namespace must match the namespace in the URL")
        if meta.get("managedFields") is not None:
            raise _error(400, "BadRequest", "metadata.managedFields must be nil in an apply")
        key = (rtype.group, rtype.plural, request.namespace if rtype.namespaced else None, request.name)

        def change(live: dict[str, Any] | None) -> dict[str, Any]:
            new, conflicts = managed_fields.apply(live, body, manager, force, _now())
            if conflicts:
                raise _error(409, "Conflict", f"Apply failed with {len(conflicts)} conflict"
                                              f"{'s' if len(conflicts) > 1 else ''}: "
                                              + "; ".join(c.describe() for c in conflicts))
            return new

        async with self._lock_():
            live = self._store.get(key)
            if live is None:
                return rendering.Response(status=201, payload=await self._insert(rtype, key, change(None)))
            return await self._update(rtype, request, key, live, change, body, operation="Apply")

    async def _serve_replace(self, request: rendering.Request) -> rendering.Payload:
        if request.resource is None or request.name is None:
            raise kmock.KubernetesEndpointNotFoundError()
        rtype = self._type(request)
        body = request.data
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        if (body.get("metadata") or {}).get("name") not in (None, request.name):
            raise _error(400, "BadRequest", "the name of the object does not match the URL")
        return await self._write(rtype, request, lambda live: copy.deepcopy(dict(body)), body)

    async def _write(self, rtype: ResourceType, request: rendering.Request, change: Any,
                     incoming: Mapping[str, Any]) -> rendering.Payload:
        key = (rtype.group, rtype.plural, request.namespace if rtype.namespaced else None, request.name)
        async with self._lock_():
            live = self._store.get(key)
            if live is None:
                raise kmock.KubernetesObjectNotFoundError(message=f"{rtype.plural} {request.name!r} not found")
            return await self._update(rtype, request, key, live, change, incoming)

    async def _update(self, rtype: ResourceType, request: rendering.Request, key: tuple[str, str, str | None, str],
                      live: dict[str, Any], change: Any, incoming: Mapping[str, Any],
                      operation: str = "Update") -> rendering.Payload:
        """Write a change to a stored object (the caller holds the lock)."""
        wanted_rv = (incoming.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != live["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", f"Operation cannot be fulfilled on {rtype.plural} {request.name!r}: "
                                          "the object has been modified; please apply your changes to the "
                                          "latest version and try again")
        if request.subresource == "scale":
            return await self._write_scale(rtype, key, live, change, _manager(request))
        if request.subresource not in (None, "status"):
            raise kmock.KubernetesNotFoundError()
        candidate = change(copy.deepcopy(live))
        new = copy.deepcopy(live)
        if request.subresource == "status":
            # The status subresource changes status and nothing else.
            new["status"] = candidate.get("status")
            if new["status"] is None:
                new.pop("status")
        else:
            for k in [k for k in new if k not in ("metadata", "status")]:
                new.pop(k)
            new.update({k: v for k, v in candidate.items() if k not in ("metadata", "status")})
            if "status" not in rtype.subresources:
                if "status" in candidate:
                    new["status"] = candidate["status"]
                else:
                    new.pop("status", None)
            meta = candidate.get("metadata") or {}
            # System fields keep their values whatever the client sends.
            system = {k: live["metadata"][k] for k in ("uid", "creationTimestamp", "generation", "namespace",
                                                        "name", "deletionTimestamp") if k in live["metadata"]}
            new["metadata"] = {**{k: v for k, v in meta.items() if k != "resourceVersion"}, **system}
            if operation == "Update":  # an apply's change already set the appliers' fields
                new["metadata"]["managedFields"] = managed_fields.after_update(live, new, _manager(request), _now())
            added = set(new["metadata"].get("finalizers") or []) - set(live["metadata"].get("finalizers") or [])
            if live["metadata"].get("deletionTimestamp") and added:
                raise _error(422, "Invalid", "no new finalizers can be added if the object is being deleted")
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        new["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if rtype.schema is not None:
            new = apply_defaults(rtype.schema, new)
        if new == live:
            return copy.deepcopy(live)  # a no-op write changes nothing, not even resourceVersion
        if self._content(new) != self._content(live):
            new["metadata"]["generation"] = int(live["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._store[key] = new
        await self._record(rtype, "MODIFIED", new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(rtype, key)
        return copy.deepcopy(new)

    def _scale_of(self, rtype: ResourceType, obj: Mapping[str, Any]) -> dict[str, Any]:
        if rtype.scale is None:
            raise kmock.KubernetesNotFoundError()
        status: dict[str, Any] = {"replicas": _get_path(obj, rtype.scale.status_replicas_path) or 0}
        if rtype.scale.label_selector_path:
            selector = _get_path(obj, rtype.scale.label_selector_path)
            if selector:
                status["selector"] = selector
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                             if k in meta},
                "spec": {"replicas": _get_path(obj, rtype.scale.spec_replicas_path) or 0}, "status": status}

    async def _write_scale(self, rtype: ResourceType, key: tuple[str, str, str | None, str],
                           live: dict[str, Any], change: Any, manager: str) -> rendering.Payload:
        scale = change(self._scale_of(rtype, live))
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise _error(422, "Invalid", f"spec.replicas: must be a non-negative integer, got {replicas!r}")
        assert rtype.scale is not None
        new = copy.deepcopy(live)
        _set_path(new, rtype.scale.spec_replicas_path, replicas)
        if new != live:
            new["metadata"]["managedFields"] = managed_fields.after_update(live, new, manager, _now())
            new["metadata"]["generation"] = int(live["metadata"].get("generation", 1)) + 1
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._store[key] = new
            await self._record(rtype, "MODIFIED", new)
        return self._scale_of(rtype, new)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        rtype = self._type(request)
        key = (rtype.group, rtype.plural, request.namespace if rtype.namespaced else None, request.name)
        async with self._lock_():
            live = self._store.get(key)
            if live is None:
                raise kmock.KubernetesObjectNotFoundError(message=f"{rtype.plural} {request.name!r} not found")
            if live["metadata"].get("finalizers"):
                if not live["metadata"].get("deletionTimestamp"):
                    live = copy.deepcopy(live)
                    live["metadata"]["deletionTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ")
                    live["metadata"]["deletionGracePeriodSeconds"] = 0
                    live["metadata"]["resourceVersion"] = self._next_rv()
                    self._store[key] = live
                    await self._record(rtype, "MODIFIED", live)
                return copy.deepcopy(live)
            removed = await self._remove(rtype, key)
        return removed

    async def _remove(self, rtype: ResourceType, key: tuple[str, str, str | None, str]) -> dict[str, Any]:
        """Remove an object for good, then garbage-collect dependents whose owners are all gone."""
        obj = self._store.pop(key)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        await self._record(rtype, "DELETED", obj)
        await self._collect_garbage()
        return copy.deepcopy(obj)

    async def _collect_garbage(self) -> None:
        live_uids = {o["metadata"]["uid"] for o in self._store.values()}
        for key, obj in list(self._store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key not in self._store or not refs or any(r.get("uid") in live_uids for r in refs):
                continue
            rtype = self._types[(key[0], key[1])]
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ")
                    obj["metadata"]["resourceVersion"] = self._next_rv()
                    self._store[key] = obj
                    await self._record(rtype, "MODIFIED", obj)
                continue
            await self._remove(rtype, key)  # recursion collects grandchildren too

    # ---- helpers for tests that play the controllers nobody runs here --------------------------------------
    def compact(self) -> None:
        """Forget the history up to now, as etcd's compaction does: watches must list again."""
        self._compacted = self._rv

    async def set_status(self, api_version: str, plural: str, namespace: str, name: str,
                         status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge into an object's status as its controller would (e.g. the deployment controller)."""
        group = api_version.rpartition("/")[0]
        rtype = self._types[(group, plural)]
        key = (group, plural, namespace, name)
        async with self._lock_():
            live = self._store[key]
            new = copy.deepcopy(live)
            new["status"] = merge_patch(live.get("status") or {}, status)
            if new == live:
                return new
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._store[key] = new
            await self._record(rtype, "MODIFIED", new)
            return copy.deepcopy(new)


def dumps(obj: Any) -> str:
    """Compact JSON for assertion messages."""
    return json.dumps(obj, sort_keys=True)[:2000]
