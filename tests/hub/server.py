"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the HTTP API the way ``huggingface_hub`` uses it.

What ``snapshot_download`` asks for, read from huggingface_hub's source (``hf_api.py``, ``file_download.py``,
``utils/_http.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``: model info; ``sha`` is the commit the download pins.
- ``GET /api/models/{repo}/tree/{commit}?recursive=True``: the file list (``type``, ``path``, ``size``, ``oid``,
  ``lfs`` for weights).
- ``HEAD`` then ``GET /{repo}/resolve/{commit}/{file}``: ``X-Repo-Commit``, ``ETag`` (``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files), ``Content-Length``; ``Range`` on GET (resumed downloads).
- Errors as the Hub sends them: ``X-Error-Code`` ``RepoNotFound`` (404), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with a token that has no access).

Repositories are directories of files given to :class:`FakeHub`; every request is recorded in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth")


@dataclass(slots=True)
class Repo:
    """One model repository: its files (path in repo -> bytes), whether it is gated, its single commit."""

    files: dict[str, bytes]
    gated: bool = False
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.commit = digest.hexdigest()


@dataclass(slots=True)
class FakeHub:
    """The stand-in server; ``start()`` serves in a thread, ``stop()`` closes the socket (the Hub goes away)."""

    repos: dict[str, Repo]
    tokens: frozenset[str] = frozenset()  # tokens granted access to gated repositories
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, authorization)
    outage: bool = False  # answer every request 503, as the Hub does during an incident
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_HubHandler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _oid(data: bytes) -> str:
    """Git's blob id of ``data`` (the tree's ``oid`` for a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class _HubHandler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # NOTE: the default writes every request to stderr

    # ---- routing ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.owner.requests.append((self.command, path, self.headers.get("authorization")))
        if self.owner.outage:
            return self._error(503, "ServiceUnavailable", "Service Unavailable")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest:
                return self._model_info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._error(404, "EntryNotFound", f"no route {path}")

    # ---- endpoints -------------------------------------------------------------------------------
    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        self._json({
            "_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": repo.commit, "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": ["safetensors"], "library_name": "transformers",
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(repo.files)],
        })

    def _tree(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        entries = []
        for name in sorted(repo.files):
            data = repo.files[name]
            entry = {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
            if _is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if repo.gated:
            auth = self.headers.get("authorization") or ""
            token = auth.removeprefix("Bearer ").strip()
            if not token:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            if token not in self.owner.tokens:
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not "
                                   "in the authorized list.")
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}",
                               {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if _is_lfs(filename):
            sha = hashlib.sha256(data).hexdigest()
            headers |= {"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
        else:
            headers["ETag"] = f'"{_oid(data)}"'
        status, body = 200, data
        ranged = self.headers.get("range")
        if ranged and ranged.startswith("bytes=") and not head:
            start_text, _, end_text = ranged[len("bytes="):].partition("-")
            start = int(start_text)
            end = int(end_text) if end_text else len(data) - 1
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    # ---- responses -------------------------------------------------------------------------------
    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` as repository content (path relative to it -> bytes)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
