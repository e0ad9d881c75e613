"""The KV compatibility record and the side channel over which engines swap NIXL metadata.

Every engine that owns KV blocks (the prefill role) serves ``GET /kv_handshake`` on ``--kv-host/--kv-port``
from a tiny HTTP server on its own thread, so it runs next to the uvicorn app in the same process whatever
event loop that uses. The answer is one JSON object::

    {"version": 1, "engine_id": ..., "agent_name": ..., "agent_metadata": <base64>, "base_address": <int>,
     "layout": {KVCacheLayout fields}, "compat": {KVCompatibility fields}}

The reading engine (decode) fetches it once per peer through ``RemotePeerCache``, which checks compatibility
before loading the peer into NIXL and drops a peer's old agent when it restarts under a new engine id.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.errors import KVIncompatibleError, KVTransferError

if TYPE_CHECKING:
    from tandem.kvtransfer.metrics import KVTransferMetrics
    from tandem.kvtransfer.nixl_transport import NixlKVTransport

logger = logging.getLogger(__name__)

HANDSHAKE_PATH = "/kv_handshake"
HANDSHAKE_VERSION = 1
# Names the memory layout of docs/interfaces.md: [num_blocks, num_layers, 2 (K, V), kv_heads, block_size, head_dim].
DEFAULT_KV_LAYOUT = "blocks-layers-kv-heads-tokens-dim"


@dataclass(frozen=True, slots=True)
class KVCompatibility:
    """What two engines must agree on to exchange KV blocks."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str = DEFAULT_KV_LAYOUT

    @classmethod
    def from_layout(cls, model: str, layout: KVCacheLayout, kv_layout: str = DEFAULT_KV_LAYOUT) -> KVCompatibility:
        """The record of an engine serving ``model`` with a KV cache of ``layout``."""
        return cls(model, layout.dtype, layout.block_size, layout.num_layers, layout.num_kv_heads, layout.head_dim, kv_layout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCompatibility:
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"compat: missing fields {missing}")
        return cls(**{name: data[name] for name in names})


def check_compatible(local: KVCompatibility, remote: KVCompatibility) -> None:
    """Raise ``KVIncompatibleError`` naming every field that differs, with both values."""
    differences = [
        (f.name, getattr(local, f.name), getattr(remote, f.name))
        for f in fields(KVCompatibility)
        if getattr(local, f.name) != getattr(remote, f.name)
    ]
    if differences:
        raise KVIncompatibleError(differences)


@dataclass(frozen=True, slots=True)
class HandshakePayload:
    """What an engine tells a peer about its KV cache so the peer can READ from it."""

    engine_id: str
    agent_name: str
    agent_metadata: bytes
    base_address: int
    layout: KVCacheLayout
    compat: KVCompatibility

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": HANDSHAKE_VERSION,
                "engine_id": self.engine_id,
                "agent_name": self.agent_name,
                "agent_metadata": base64.b64encode(self.agent_metadata).decode("ascii"),
                "base_address": self.base_address,
                "layout": asdict(self.layout),
                "compat": self.compat.to_dict(),
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> HandshakePayload:
        """Parse a handshake answer. Raises ValueError on anything malformed."""
        try:
            data = json.loads(raw)
            if data.get("version") != HANDSHAKE_VERSION:
                raise ValueError(f"unsupported handshake version {data.get('version')!r}")
            return cls(
                engine_id=str(data["engine_id"]),
                agent_name=str(data["agent_name"]),
                agent_metadata=base64.b64decode(data["agent_metadata"], validate=True),
                base_address=int(data["base_address"]),
                layout=KVCacheLayout(**data["layout"]),
                compat=KVCompatibility.from_dict(data["compat"]),
            )
        except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError and binascii.Error are ValueErrors
            raise ValueError(f"malformed handshake payload: {exc}") from exc


def make_payload(transport: NixlKVTransport, engine_id: str, compat: KVCompatibility) -> HandshakePayload:
    """The handshake answer for an engine's transport."""
    return HandshakePayload(
        engine_id=engine_id,
        agent_name=transport.agent_name,
        agent_metadata=transport.agent_metadata(),
        base_address=transport.base_address,
        layout=transport.layout,
        compat=compat,
    )


class _HandshakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], payload_provider: Callable[[], HandshakePayload]) -> None:
        self.payload_provider = payload_provider
        super().__init__(address, _HandshakeHandler)


class _HandshakeHandler(BaseHTTPRequestHandler):
    server: _HandshakeHTTPServer
    timeout = 10  # a client that stalls mid-request cannot hold a thread forever

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] != HANDSHAKE_PATH:
            self._answer(404, b'{"error": "not found"}')
            return
        try:
            body = self.server.payload_provider().to_json()
        except Exception as exc:  # the provider is engine code; report, do not kill the server thread
            logger.exception("handshake payload provider failed")
            self._answer(503, json.dumps({"error": f"handshake unavailable: {exc}"}).encode())
            return
        self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        logger.debug("handshake %s: " + format, self.client_address[0], *args)


class HandshakeServer:
    """Serves ``GET /kv_handshake`` on ``host:port`` from a background thread (port 0 picks a free port).

    ``payload_provider`` is called per request, so it may reflect a re-registered buffer.
    """

    def __init__(self, host: str, port: int, payload_provider: Callable[[], HandshakePayload]) -> None:
        self._server = _HandshakeHTTPServer((host, port), payload_provider)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"kv-handshake:{self.port}", daemon=True
        )
        self._thread.start()
        self._closed = False

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and free the socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_s)

    def __enter__(self) -> HandshakeServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def fetch_handshake(host: str, port: int, timeout_s: float = 5.0) -> HandshakePayload:
    """GET a peer's handshake payload.

    Raises:
        KVTransferError: unreachable, timed out, non-200 or malformed (reason ``"handshake"``).
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", HANDSHAKE_PATH, headers={"Accept": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise KVTransferError(
                f"KV handshake with {host}:{port} answered {response.status}: {body[:200]!r}", reason="handshake"
            )
        return HandshakePayload.from_json(body)
    except KVTransferError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise KVTransferError(f"KV handshake with {host}:{port} failed: {exc}", reason="handshake") from exc
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class RemotePeer:
    """A peer engine loaded into the local NIXL agent: what ``start_read`` needs to READ from it."""

    engine_id: str
    agent_name: str
    base_address: int
    layout: KVCacheLayout
    host: str
    port: int


class RemotePeerCache:
    """Handshakes once per peer engine and keeps its NIXL agent loaded.

    Keyed by engine id; a new engine id at a known ``host:port`` means the peer restarted, so its old agent is
    removed before the new one is loaded.
    """

    def __init__(
        self,
        transport: NixlKVTransport,
        local_compat: KVCompatibility,
        timeout_s: float = 5.0,
        metrics: KVTransferMetrics | None = None,
    ) -> None:
        self._transport = transport
        self._local_compat = local_compat
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._by_engine: dict[str, RemotePeer] = {}
        self._by_address: dict[tuple[str, int], str] = {}
        # One handshake at a time: two requests for a new peer must not both load its agent.
        self._lock = threading.Lock()

    def get(self, host: str, port: int, engine_id: str | None = None) -> RemotePeer:
        """The peer serving at ``host:port``, handshaking first if needed.

        ``engine_id`` (the ``remote_engine_id`` of ``kv_transfer_params``) skips the network when already known
        and guards against reading from a peer that restarted since it produced the blocks.

        Raises:
            KVIncompatibleError: the peer's compatibility record differs (every differing field is named).
            KVTransferError: the handshake failed, or the peer now reports a different engine id.
        """
        with self._lock:
            if engine_id is not None and engine_id in self._by_engine:
                return self._by_engine[engine_id]
            if engine_id is None and (host, port) in self._by_address:
                return self._by_engine[self._by_address[(host, port)]]
            try:
                payload = fetch_handshake(host, port, self._timeout_s)
                check_compatible(self._local_compat, payload.compat)
            except KVTransferError as exc:
                if self._metrics is not None:
                    self._metrics.record_failure(exc.reason)
                raise
            old_engine = self._by_address.get((host, port))
            if old_engine is not None and old_engine != payload.engine_id:
                self._drop(old_engine)
            if payload.engine_id not in self._by_engine:
                agent_name = self._transport.add_remote_agent(payload.agent_metadata)
                peer = RemotePeer(payload.engine_id, agent_name, payload.base_address, payload.layout, host, port)
                self._by_engine[payload.engine_id] = peer
                self._by_address[(host, port)] = payload.engine_id
            if engine_id is not None and payload.engine_id != engine_id:
                raise KVTransferError(
                    f"KV peer {host}:{port} is now engine {payload.engine_id!r}, not {engine_id!r} "
                    "(it restarted; its blocks are gone)",
                    reason="handshake",
                )
            return self._by_engine[payload.engine_id]

    def forget(self, engine_id: str) -> None:
        """Drop a peer (e.g. after its transfers failed) so the next ``get`` handshakes again."""
        with self._lock:
            self._drop(engine_id)

    def peers(self) -> list[RemotePeer]:
        """The peers currently loaded."""
        with self._lock:
            return list(self._by_engine.values())

    def _drop(self, engine_id: str) -> None:
        peer = self._by_engine.pop(engine_id, None)
        if peer is None:
            return
        if self._by_address.get((peer.host, peer.port)) == engine_id:
            del self._by_address[(peer.host, peer.port)]
        self._transport.remove_remote_agent(peer.agent_name)
