"""Field ownership for the API emulator: ``metadata.managedFields`` and server-side apply, as the API server
does them for what an operator can observe.

A field is a path of FieldsV1 keys: ``f:name`` for a map key, ``k:{"name":"x"}`` for the item of a list keyed
by ``name`` (containers, env, ports, volumes...). Every other list is atomic: one field, owned whole, as
the API server treats lists without a merge key. NOTE: the real server keys some lists by other fields
(``containerPort``, ``mountPath``); keying by ``name`` only is this emulator's approximation, and ``status``
is left out of ownership (nothing here applies status).

- An update (POST, PUT, merge or JSON patch) gives its manager the fields it changed, taking them from
  other managers, as the API server does for operation ``Update``.
- An apply (``PATCH`` with ``application/apply-patch+yaml``) creates the object if absent, merges the
  applied fields in, removes fields this manager applied before and no longer applies (unless another
  manager owns them), and answers 409 when another manager owns a field the apply would change, unless
  ``force`` is set, which moves those fields to the applier.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FieldPath = tuple[str, ...]

# Metadata fields the server owns; never part of any manager's set.
SYSTEM_METADATA = frozenset({"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                             "managedFields", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"})
_MISSING = object()


@dataclass(frozen=True, slots=True)
class ApplyConflict:
    """A field another manager owns with a value the apply would change."""

    manager: str
    path: FieldPath

    def describe(self) -> str:
        """The API server's wording: ``conflict with "kubectl-edit": .spec.replicas``."""
        return f'conflict with "{self.manager}": {path_string(self.path)}'


def _is_keyed(items: list[Any]) -> bool:
    names = [item.get("name") for item in items if isinstance(item, Mapping)]
    return bool(items) and len(names) == len(items) and all(isinstance(n, str) for n in names) \
        and len(set(names)) == len(names)


def _item_key(item: Mapping[str, Any]) -> str:
    return "k:" + json.dumps({"name": item["name"]}, separators=(",", ":"))


def _fields_of(value: Any, prefix: FieldPath, out: dict[FieldPath, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, child in value.items():
            _fields_of(child, prefix + (f"f:{key}",), out)
    elif isinstance(value, list) and _is_keyed(value):
        for item in value:
            _fields_of(item, prefix + (_item_key(item),), out)
    else:
        out[prefix] = value


def fields(obj: Mapping[str, Any]) -> dict[FieldPath, Any]:
    """Every field an object sets (path -> value), leaving out identity, system metadata and status."""
    out: dict[FieldPath, Any] = {}
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata":
            for mkey, mvalue in (value or {}).items():
                if mkey not in SYSTEM_METADATA:
                    _fields_of(mvalue, ("f:metadata", f"f:{mkey}"), out)
        else:
            _fields_of(value, (f"f:{key}",), out)
    return out


def value_at(obj: Any, path: FieldPath) -> Any:
    """The value at a field path, or ``_MISSING``."""
    for part in path:
        if part.startswith("f:") and isinstance(obj, Mapping) and part[2:] in obj:
            obj = obj[part[2:]]
        elif part.startswith("k:") and isinstance(obj, list):
            name = json.loads(part[2:])["name"]
            obj = next((i for i in obj if isinstance(i, Mapping) and i.get("name") == name), _MISSING)
            if obj is _MISSING:
                return _MISSING
        else:
            return _MISSING
    return obj


def path_string(path: FieldPath) -> str:
    """``.spec.template.spec.containers[name="decode"].command``, as the API server prints a field."""
    text = ""
    for part in path:
        if part.startswith("f:"):
            text += "." + part[2:]
        else:
            ((key, value),) = json.loads(part[2:]).items()
            text += f'[{key}="{value}"]'
    return text


def encode(paths: Iterable[FieldPath]) -> dict[str, Any]:
    """A FieldsV1 tree: nested keys, ``{}`` at each owned field, ``"."`` marking an owned list item."""
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for i, part in enumerate(path):
            node = node.setdefault(part, {})
            if part.startswith("k:") and i < len(path) - 1:
                node.setdefault(".", {})
    return tree


def decode(tree: Mapping[str, Any], prefix: FieldPath = ()) -> set[FieldPath]:
    """The owned fields of a FieldsV1 tree."""
    out: set[FieldPath] = set()
    for key, child in tree.items():
        if key == ".":
            continue
        if child and any(k != "." for k in child):
            out |= decode(child, prefix + (key,))
        else:
            out.add(prefix + (key,))
    return out


@dataclass(slots=True)
class Entry:
    """One ``managedFields`` entry: a manager, its operation, and the fields it owns."""

    manager: str
    operation: str  # "Apply" or "Update"
    api_version: str
    time: str
    paths: set[FieldPath]

    def as_dict(self) -> dict[str, Any]:
        return {"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version,
                "time": self.time, "fieldsType": "FieldsV1", "fieldsV1": encode(self.paths)}


def entries(obj: Mapping[str, Any] | None) -> list[Entry]:
    """The managers recorded on an object."""
    found = []
    for raw in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        found.append(Entry(raw["manager"], raw["operation"], raw.get("apiVersion", ""), raw.get("time", ""),
                           decode(raw.get("fieldsV1") or {})))
    return found


def _store(entries_: list[Entry], previous: list[Entry]) -> list[dict[str, Any]]:
    """Entries as stored: empty ones dropped; an entry keeps its time while its fields stay the same."""
    before = {(e.manager, e.operation): e for e in previous}
    stored = []
    for entry in entries_:
        if not entry.paths:
            continue
        old = before.get((entry.manager, entry.operation))
        if old is not None and old.paths == entry.paths:
            entry.time = old.time
        stored.append(entry.as_dict())
    return stored


def _own(entries_: list[Entry], manager: str, operation: str, api_version: str, now: str) -> Entry:
    for entry in entries_:
        if (entry.manager, entry.operation) == (manager, operation):
            entry.api_version = api_version
            return entry
    entry = Entry(manager, operation, api_version, now, set())
    entries_.append(entry)
    return entry


def after_update(old: Mapping[str, Any] | None, new: Mapping[str, Any], manager: str,
                 now: str) -> list[dict[str, Any]]:
    """``managedFields`` after an update by ``manager``: it owns what it changed; what was removed is
    nobody's."""
    previous = entries(old)
    current = copy.deepcopy(previous)
    old_fields, new_fields = fields(old or {}), fields(new)
    changed = {p for p, v in new_fields.items() if old_fields.get(p, _MISSING) != v}
    for entry in current:
        entry.paths = {p for p in entry.paths if p in new_fields and p not in changed}
    if changed:
        _own(current, manager, "Update", new["apiVersion"], now).paths |= changed
    return _store(current, previous)


def _merge(live: Any, applied: Any) -> Any:
    """Applied values over live ones: maps merge, lists keyed by name merge item by item, the rest replace."""
    if isinstance(live, Mapping) and isinstance(applied, Mapping):
        merged = dict(live)
        for key, value in applied.items():
            merged[key] = _merge(live.get(key, _MISSING), value)
        return merged
    if isinstance(live, list) and isinstance(applied, list) and _is_keyed(applied) and (not live or _is_keyed(live)):
        by_name = {item["name"]: item for item in live}
        merged_items = [_merge(by_name.get(item["name"], _MISSING), item) for item in applied]
        applied_names = {item["name"] for item in applied}
        return merged_items + [item for item in live if item["name"] not in applied_names]
    return copy.deepcopy(applied)


def _remove(obj: Any, path: FieldPath) -> None:
    """Delete a field, and the maps and list items that only held it."""
    if not path or obj is _MISSING:
        return
    head, rest = path[0], path[1:]
    if head.startswith("f:") and isinstance(obj, dict) and head[2:] in obj:
        if rest:
            _remove(obj[head[2:]], rest)
            if obj[head[2:]] in ({}, []):
                del obj[head[2:]]
        else:
            del obj[head[2:]]
    elif head.startswith("k:") and isinstance(obj, list):
        name = json.loads(head[2:])["name"]
        for i, item in enumerate(obj):
            if isinstance(item, dict) and item.get("name") == name:
                # NOTE: the key goes last, with the item (longer paths are removed first).
                if rest != ("f:name",):
                    _remove(item, rest)
                elif set(item) <= {"name"}:
                    del obj[i]
                return


def apply(live: Mapping[str, Any] | None, applied: Mapping[str, Any], manager: str, force: bool,
          now: str) -> tuple[dict[str, Any], list[ApplyConflict]]:
    """The object after ``manager`` applies ``applied`` (with its ``managedFields``), and the conflicts that
    stopped it (then the object is unchanged; with ``force`` there are none)."""
    previous = entries(live)
    current = copy.deepcopy(previous)
    applied_fields = fields(applied)
    conflicts = []
    for entry in current:
        if (entry.manager, entry.operation) == (manager, "Apply"):
            continue
        for path in sorted(entry.paths & applied_fields.keys()):
            if value_at(live or {}, path) != applied_fields[path]:
                conflicts.append(ApplyConflict(entry.manager, path))
    if conflicts and not force:
        return dict(live or {}), conflicts
    taken = {c.path for c in conflicts}
    for entry in current:
        if (entry.manager, entry.operation) != (manager, "Apply"):
            entry.paths -= taken
    mine = _own(current, manager, "Apply", applied["apiVersion"], now)
    others = set().union(*(e.paths for e in current if e is not mine))
    dropped = mine.paths - applied_fields.keys() - others
    new = _merge(copy.deepcopy(dict(live or {})), {k: v for k, v in applied.items() if k != "status"})
    for path in sorted(dropped, key=lambda p: (len(p), p[-1] != "f:name"), reverse=True):
        _remove(new, path)
    mine.paths = set(applied_fields)
    new.setdefault("metadata", {})["managedFields"] = _store(current, previous)
    return new, []
