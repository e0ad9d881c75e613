"""Tenants: API keys mapped to named tenants with request and token limits, from a file the router watches.

The file (YAML or JSON; in Kubernetes a Secret mounted as a file, which the kubelet updates in place)::

    tenants:
      - name: acme
        api_keys: [sk-acme-1, sk-acme-2]
        requests_per_minute: 600     # optional: no limit when absent
        tokens_per_minute: 200000    # optional: prompt + completion tokens

Changes apply without a restart: the watcher re-reads the file when it changes; a file that no longer parses is
logged and the previous table stays in force (a typo must not lock every tenant out).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant and its per-minute limits (None: unlimited)."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def _key_digest(key: str) -> bytes:
    # NOTE: keys are looked up by their SHA-256, so the lookup's timing says nothing about a key's characters.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class TenantTable:
    """API key (by digest) -> tenant."""

    by_key: dict[bytes, Tenant] = field(default_factory=dict)

    def tenant_for(self, api_key: str) -> Tenant | None:
        return self.by_key.get(_key_digest(api_key))

    def __len__(self) -> int:
        return len({t.name for t in self.by_key.values()})


def _limit(entry: dict[str, Any], name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}.{name}: must be a positive integer, got {value!r}")
    return value


def parse_tenants(document: Any) -> TenantTable:
    """Validate a parsed tenants document; errors name the offending field (``tenants[1].api_keys``)."""
    if not isinstance(document, dict) or not isinstance(document.get("tenants"), list):
        raise ValueError("tenants: the file must be a mapping with a 'tenants' list")
    by_key: dict[bytes, Tenant] = {}
    names: set[str] = set()
    known = {"name", "api_keys", "requests_per_minute", "tokens_per_minute"}
    for i, entry in enumerate(document["tenants"]):
        where = f"tenants[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown field (expected {', '.join(sorted(known))})")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name: must be a non-empty string")
        if name in names:
            raise ValueError(f"{where}.name: tenant {name!r} is defined twice")
        names.add(name)
        keys = entry.get("api_keys")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"{where}.api_keys: must be a non-empty list of non-empty strings")
        tenant = Tenant(name, _limit(entry, "requests_per_minute", where), _limit(entry, "tokens_per_minute", where))
        for key in keys:
            digest = _key_digest(key)
            if digest in by_key:
                raise ValueError(f"{where}.api_keys: a key is also given to tenant {by_key[digest].name!r}")
            by_key[digest] = tenant
    return TenantTable(by_key)


def load_tenants(path: str | Path) -> TenantTable:
    """Read and validate a tenants file (YAML, which includes JSON)."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"tenants: {path} is not valid YAML/JSON: {exc}") from exc
    return parse_tenants(document)


class TenantWatcher:
    """Holds the current table and reloads it when the file changes (polled: works for Secret volume mounts,
    whose updates swap a symlink rather than writing the file)."""

    def __init__(self, path: str | Path, interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.table = load_tenants(self.path)  # a bad file at start-up is a configuration error
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows symlinks: a swapped Secret mount changes inode and mtime
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> bool:
        """Reload if the file changed; True when a new table took effect."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            table = load_tenants(self.path)
        except (OSError, ValueError) as exc:
            logger.error("tenants file %s not reloaded, keeping the previous table: %s", self.path, exc)
            return False
        self.table = table
        logger.info("tenants file %s reloaded: %d tenants", self.path, len(table))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.poll()
