"""The NIXL KV connector: the glue between the engine's scheduler and the NIXL transport.

Like vLLM's KV connectors it has two halves in one object:

* the scheduler half (``KVConnectorSchedulerSide``, called on the engine thread by ``Scheduler``): how many
  prompt tokens will arrive from a remote engine, which local blocks they land in, which loads finished, and,
  when a request finishes, whether its blocks must be held for a remote reader;
* the worker half: the engine's ``kv_buffer`` registered once with NIXL, a handshake side channel that tells
  peers how to READ it, a load thread that pulls blocks (NIXL READ, all layers, whole blocks), and the
  housekeeping (``housekeeping()``, a step hook) that turns peers' completion notifications and expired
  leases into blocks the scheduler may free.

Exporting side (``do_remote_decode``, the prefill role): a finished request's blocks are leased for
``lease_seconds`` and described in the returned ``kv_transfer_params``; the reader's notification
``done:<num_blocks>:<remote_request_id>`` (sent by NIXL when its READ completes, or standalone when it gave up)
or the lease's expiry frees them, whichever comes first.

Importing side (``do_remote_prefill``, the decode role): when the prefill's first token came with the request
(``first_token_id``: the engine streams it at once) the KV of the whole prompt is pulled, else that of the first
``num_prompt_tokens - 1`` tokens, into the request's own blocks (only those its prefix cache lacks); the
scheduler then computes the one remaining token locally and samples, so greedy output equals aggregated
serving exactly. A failed load
either recomputes the prompt locally (policy ``recompute``) or ends the request with an error (``fail``).

NOTE: threads. The scheduler half and ``housekeeping`` run on the engine thread only. READs (which with UCX's
``cma`` copy synchronously inside ``start_read``) and handshakes (HTTP to the peer) run on one load thread,
never on the engine thread or the event loop; results come back through a thread-safe queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tandem.kvtransfer.errors import KVTransferError, KVTransferUnavailable
from tandem.kvtransfer.handshake import HandshakePayload, HandshakeServer, KVCompatibility, RemotePeerCache, make_payload
from tandem.kvtransfer.leases import LeaseTable
from tandem.tracing import SpanKind, mark_error, span_from_traceparent, tracer

if TYPE_CHECKING:
    import torch

    from tandem.engine.core.kv_layout import KVCacheLayout
    from tandem.engine.core.request import Request
    from tandem.kvtransfer.metrics import KVTransferMetrics
    from tandem.kvtransfer.nixl_transport import NixlKVTransport

logger = logging.getLogger(__name__)
_TRACER = tracer("tandem.kvtransfer")  # a no-op unless tracing is set up (OTEL_* variables)

ROLES = ("prefill", "decode")
LOAD_FAILURE_POLICIES = ("recompute", "fail")
NOTIF_PREFIX = b"done:"


@dataclass(frozen=True, slots=True)
class KVConnectorConfig:
    """How one engine takes part in KV transfer.

    Args:
        role: ``prefill`` or ``decode`` (the ``role`` label of the metrics; both roles can export and import).
        kv_host, kv_port: where the handshake side channel listens (port 0: any free port).
        advertise_kv_host: the host peers use to reach the side channel (default: ``kv_host``, or 127.0.0.1
            when that is a wildcard address).
        lease_seconds: how long exported blocks wait for their reader before they are freed anyway.
        ucx_transports: ``UCX_TLS`` for the NIXL UCX backend (None: UCX's default).
        load_failure_policy: ``recompute`` (compute the prompt locally) or ``fail`` (end the request with an error).
        transfer_timeout_s: how long one READ may take before it counts as failed.
        handshake_timeout_s: how long the HTTP handshake with a peer may take.
    """

    role: str
    kv_host: str = "127.0.0.1"
    kv_port: int = 0
    advertise_kv_host: str | None = None
    lease_seconds: float = 30.0
    ucx_transports: str | None = None
    load_failure_policy: str = "recompute"
    transfer_timeout_s: float = 10.0
    handshake_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {self.role!r}")
        if self.load_failure_policy not in LOAD_FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy: must be one of {LOAD_FAILURE_POLICIES}, got {self.load_failure_policy!r}")
        if not 0 <= self.kv_port <= 65535:
            raise ValueError(f"kv_port: must be in [0, 65535], got {self.kv_port}")
        for name in ("lease_seconds", "transfer_timeout_s", "handshake_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def advertised_host(self) -> str:
        if self.advertise_kv_host:
            return self.advertise_kv_host
        return "127.0.0.1" if self.kv_host in ("0.0.0.0", "::", "") else self.kv_host


@dataclass(frozen=True, slots=True)
class RemotePrefill:
    """The parsed ``kv_transfer_params`` of a request whose prompt KV lives on a remote (prefill) engine."""

    engine_id: str
    host: str
    port: int
    block_ids: tuple[int, ...]
    request_id: str
    num_prompt_tokens: int | None = None
    block_size: int | None = None
    lease_expires_at: float | None = None  # unix time (time.time()) after which the blocks may be gone
    traceparent: str | None = None  # the request's trace (W3C), so the transfer is a span of it (tandem.tracing)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RemotePrefill:
        """Parse ``params``. Raises ValueError naming the first bad field."""

        def need(name: str, kind: type | tuple[type, ...]):
            value = params.get(name)
            if value is None or isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"kv_transfer_params.{name}: missing or not a {getattr(kind, '__name__', kind)}")
            return value

        block_ids = need("remote_block_ids", list)
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in block_ids):
            raise ValueError("kv_transfer_params.remote_block_ids: must be non-negative integers")
        optional = {}
        for name, kind in (("num_prompt_tokens", int), ("block_size", int), ("lease_expires_at", (int, float))):
            if params.get(name) is not None:
                optional[name] = need(name, kind)
        if isinstance(params.get("traceparent"), str):
            optional["traceparent"] = params["traceparent"]
        port = need("remote_port", int)
        if not 0 < port <= 65535:
            raise ValueError(f"kv_transfer_params.remote_port: {port} is not a port")
        return cls(
            engine_id=need("remote_engine_id", str),
            host=need("remote_host", str),
            port=port,
            block_ids=tuple(block_ids),
            request_id=need("remote_request_id", str),
            **optional,
        )


@dataclass(frozen=True, slots=True)
class _LoadJob:
    request_id: str  # local engine request id
    remote: RemotePrefill
    remote_block_ids: tuple[int, ...]
    local_block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _LoadResult:
    request_id: str
    ok: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Export:
    granted_at: float  # time.monotonic()
    num_blocks: int


def format_notification(request_id: str, num_blocks: int) -> bytes:
    """The reader's completion notice: ``done:<num_blocks read>:<remote_request_id>`` (0 blocks: gave up)."""
    return NOTIF_PREFIX + f"{num_blocks}:{request_id}".encode()


def parse_notification(message: bytes) -> tuple[str, int] | None:
    """(request id, blocks read) of a completion notice, or None for anything else."""
    if not message.startswith(NOTIF_PREFIX):
        return None
    count, sep, request_id = message[len(NOTIF_PREFIX):].decode(errors="replace").partition(":")
    if not sep or not count.isdigit() or not request_id:
        return None
    return request_id, int(count)


class NixlConnector:
    """KV connector over NIXL: the scheduler half (engine thread) and the worker half (NIXL, threads).

    Lifecycle: create it, pass it to ``LLMEngine(config, connector=...)``, then ``attach`` the engine's KV
    buffer, ``start_side_channel``, run ``housekeeping`` after every engine step, and ``close`` at the end.
    Until ``attach`` it neither imports nor exports (requests are served locally).
    """

    def __init__(self, config: KVConnectorConfig) -> None:
        self.config = config
        self.engine_id = uuid.uuid4().hex  # a new id per process: a restarted peer is told apart
        self.transport: NixlKVTransport | None = None
        self.metrics: KVTransferMetrics | None = None
        self.layout: KVCacheLayout | None = None
        self.compat: KVCompatibility | None = None
        self._peers: RemotePeerCache | None = None
        self._side_channel: HandshakeServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._submit_lock = threading.Lock()  # orders submissions against close()
        self._closed = False
        # Exporting side.
        self._leases = LeaseTable()
        self._exports: dict[str, _Export] = {}  # engine thread only
        self._finished_sending: list[str] = []  # engine thread only
        # Importing side.
        self._results: queue.SimpleQueue[_LoadResult] = queue.SimpleQueue()
        self._loading: dict[str, _LoadJob] = {}  # engine thread only
        self._load_errors: dict[str, str] = {}  # engine thread only: request id -> error (policy "fail")
        # Called on the load thread after each load result: lets the owner wake an idle engine loop at once
        # instead of at its next poll (the result sits on the engine's TTFT path).
        self.on_load_result: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------ lifecycle
    def attach(self, kv_buffer: torch.Tensor, layout: KVCacheLayout, model_name: str,
               metrics: KVTransferMetrics | None = None) -> None:
        """Register the engine's KV cache with NIXL (once) and start the load thread.

        Raises:
            KVTransferUnavailable: NIXL or its UCX backend cannot start.
        """
        from tandem.kvtransfer.nixl_transport import NixlKVTransport

        agent = f"tandem-{self.config.role}-{self.engine_id[:16]}"
        # NOTE: metrics are recorded here, once per load, not by the transport or the peer cache: each of those
        # sees only part of a load's failure modes, and the decode side must count exactly one per failed load.
        # A decode engine only READs: it progresses its own transfers (see nixl_transport's module note).
        self.transport = NixlKVTransport(kv_buffer, layout, agent, self.config.ucx_transports,
                                         progress_thread=self.config.role != "decode")
        self.layout = layout
        self.metrics = metrics
        self.compat = KVCompatibility.from_layout(model_name, layout)
        self._peers = RemotePeerCache(self.transport, self.compat, self.config.handshake_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-kv-load")
        logger.info("kv transfer: engine %s registered %d MiB of KV cache with NIXL as %s", self.engine_id,
                    layout.total_bytes >> 20, agent)

    def start_side_channel(self) -> int:
        """Serve the handshake on ``kv_host:kv_port`` (before ``attach`` it answers 503); returns the port."""
        if self._side_channel is None:
            self._side_channel = HandshakeServer(self.config.kv_host, self.config.kv_port, self.handshake_payload)
        return self._side_channel.port

    @property
    def side_channel_port(self) -> int | None:
        return None if self._side_channel is None else self._side_channel.port

    def handshake_payload(self) -> HandshakePayload:
        """What a peer needs to READ from this engine (called by the side channel's thread)."""
        if self.transport is None or self.compat is None or self._closed:
            raise KVTransferUnavailable("the engine is still loading (or shutting down)")
        return make_payload(self.transport, self.engine_id, self.compat)

    def close(self) -> None:
        """Stop the side channel and the load thread, then release NIXL. Safe to call twice."""
        with self._submit_lock:
            self._closed = True
        if self._side_channel is not None:
            self._side_channel.close()
        if self._executor is not None:
            # A READ in progress finishes (it writes into engine memory that is still alive); queued ones go.
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ scheduler half: importing
    def get_num_new_matched_tokens(self, request: Request, num_local_computed_tokens: int) -> int:
        """Tokens beyond the local prefix hits whose KV a remote prefill computed: all but the last known
        token (the whole prompt when the prefill's first token came with the request, else all but its last)."""
        remote = self._remote_prefill(request)
        if remote is None:
            return 0
        return max(0, num_tokens_to_load(request) - num_local_computed_tokens)

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_local_blocks: int,
                                 num_external_tokens: int) -> None:
        """Blocks ``block_ids[num_local_blocks:]`` await the remote KV: queue the READ."""
        remote = self._remote_prefill(request)
        assert remote is not None and self.layout is not None, "get_num_new_matched_tokens said there was KV to load"
        blocks = block_range(num_tokens_to_load(request), self.layout.block_size, num_local_blocks)
        job = _LoadJob(request.request_id, remote, remote.block_ids[blocks.start:blocks.stop],
                       tuple(block_ids[blocks.start:blocks.stop]))
        self._loading[request.request_id] = job
        with self._submit_lock:
            if not self._closed and self._executor is not None:
                self._executor.submit(self._load, job)
                return
        self._results.put(_LoadResult(job.request_id, False, "the KV connector is shutting down"))

    def get_finished_recving(self) -> dict[str, bool]:
        """Loads that ended since the last call: request id -> whether the KV arrived intact."""
        done: dict[str, bool] = {}
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return done
            if self._loading.pop(result.request_id, None) is None:
                continue
            done[result.request_id] = result.ok
            if not result.ok and self.config.load_failure_policy == "fail":
                self._load_errors[result.request_id] = f"kv transfer failed: {result.error}"

    def load_failure_error(self, request_id: str) -> str | None:
        """After a failed load: the error to end the request with (policy ``fail``), or None to recompute."""
        return self._load_errors.pop(request_id, None)

    @property
    def num_loading(self) -> int:
        """Loads queued or in flight (engine thread view)."""
        return len(self._loading)

    def _remote_prefill(self, request: Request) -> RemotePrefill | None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or self.layout is None:
            return None
        if request.group_id is not None:
            return None  # n > 1: only the first sample pulls; its siblings share its cached prompt blocks
        if request.sampling_params.prompt_logprobs is not None:
            return None  # prompt logprobs need the prompt's own forward pass
        try:
            remote = RemotePrefill.from_params(params)
        except ValueError as exc:
            logger.warning("request %s: ignoring kv_transfer_params, computing the prompt locally: %s",
                           request.request_id, exc)
            return None
        bs = self.layout.block_size
        problem = None
        if remote.block_size is not None and remote.block_size != bs:
            problem = f"block_size {remote.block_size} differs from the local {bs}"
        elif remote.num_prompt_tokens is not None and remote.num_prompt_tokens != request.num_prompt_tokens:
            problem = f"num_prompt_tokens {remote.num_prompt_tokens} differs from this prompt's {request.num_prompt_tokens}"
        elif request.num_preseeded_tokens > 1:
            problem = "the remote engine holds the KV of the prompt only"
        elif len(remote.block_ids) < -(-num_tokens_to_load(request) // bs):
            problem = f"{len(remote.block_ids)} remote_block_ids cannot hold {num_tokens_to_load(request)} tokens"
        if problem is not None:
            logger.warning("request %s: ignoring kv_transfer_params, computing the prompt locally: %s",
                           request.request_id, problem)
            return None
        return remote

    # ------------------------------------------------------------------ scheduler half: exporting
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Hold a ``do_remote_decode`` request's blocks under a lease and describe them for the reader."""
        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            # Its KV was never pulled (the prompt was cached locally): let the prefill engine free its lease now.
            remote = self._remote_prefill(request)
            if remote is not None:
                self._submit_notice(remote)
            return False, None
        port = self.side_channel_port
        if not params.get("do_remote_decode") or not block_ids or self.layout is None or port is None:
            return False, None
        rid = request.request_id
        if rid in self._leases:
            logger.warning("request %s: an earlier request with this id still holds a lease; not exporting", rid)
            return False, None
        lease_s = self.config.lease_seconds
        self._leases.grant(rid, block_ids, lease_s)
        self._exports[rid] = _Export(time.monotonic(), len(block_ids))
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_host": self.config.advertised_host,
            "remote_port": port,
            "remote_block_ids": list(block_ids),
            "remote_request_id": rid,
            "num_prompt_tokens": request.num_prompt_tokens,
            "block_size": self.layout.block_size,
            "lease_seconds": lease_s,
            "lease_expires_at": time.time() + lease_s,
            **first_token_params(request),
        }

    def get_finished_sending(self) -> list[str]:
        """Requests whose held blocks may be freed now (read by the peer, or lease expired)."""
        done, self._finished_sending = self._finished_sending, []
        return done

    def housekeeping(self) -> None:
        """Engine-thread step hook: read peers' completion notices and expire leases."""
        transport = self.transport
        if transport is None:
            return
        try:
            notifications = transport.poll_notifications()
        except KVTransferError as exc:
            logger.warning("kv transfer: polling notifications failed: %s", exc)
            notifications = []
        for agent, message in notifications:
            parsed = parse_notification(message)
            if parsed is None:
                logger.debug("kv transfer: ignoring notification %r from %s", message[:80], agent)
                continue
            rid, num_blocks = parsed
            if self._leases.release(rid) is None:
                continue  # expired already, or not ours
            export = self._exports.pop(rid, None)
            self._finished_sending.append(rid)
            if self.metrics is not None and export is not None and num_blocks:
                assert self.layout is not None
                self.metrics.record_transfer(num_blocks * self.layout.bytes_per_block_all_layers, num_blocks,
                                             time.monotonic() - export.granted_at)
        for rid, _blocks in self._leases.expire():
            self._exports.pop(rid, None)
            self._finished_sending.append(rid)
            logger.warning("kv transfer: lease of request %s expired before a reader confirmed; freeing its blocks", rid)
            if self.metrics is not None:
                self.metrics.record_failure("lease_expired")

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    # ---------------------------------------------------------------------- worker half (load thread)
    def _load(self, job: _LoadJob) -> None:
        """Load thread: pull one request's blocks and report the outcome. Never raises."""
        with span_from_traceparent(_TRACER, "kv_transfer", job.remote.traceparent, SpanKind.CLIENT,
                                   **{"tandem.request_id": job.request_id, "tandem.kv.blocks": len(job.remote_block_ids),
                                      "tandem.kv.peer": f"{job.remote.host}:{job.remote.port}"}) as span:
            result = self._pull(job)
            if not result.ok:
                mark_error(span, result.error or "failed")
        self._results.put(result)
        if self.on_load_result is not None:
            try:
                self.on_load_result()
            except Exception:  # noqa: BLE001 - waking is an optimisation; the engine polls anyway
                logger.debug("kv transfer: waking the engine failed", exc_info=True)

    def _pull(self, job: _LoadJob) -> _LoadResult:
        """Handshake (once per peer), READ the blocks, tell the owner; the outcome as a result."""
        transport, peers, layout = self.transport, self._peers, self.layout
        assert transport is not None and peers is not None and layout is not None
        remote = job.remote
        peer = None
        try:
            self._check_lease(remote, "before the READ started")
            peer = peers.get(remote.host, remote.port, remote.engine_id)
            handle = transport.read_blocks(
                peer.agent_name, peer.base_address, peer.layout, job.remote_block_ids, job.local_block_ids,
                notif=format_notification(remote.request_id, len(job.remote_block_ids)),
                timeout_s=self.config.transfer_timeout_s,
            )
            # The owner keeps the blocks until the deadline at least; a READ that ended later may hold reused blocks.
            self._check_lease(remote, "while the READ was in flight")
        except Exception as exc:  # noqa: BLE001 - every failure ends the same way: report it, never leak
            reason = exc.reason if isinstance(exc, KVTransferError) else "invalid_params" if isinstance(exc, ValueError) else "internal"
            if reason == "internal":
                logger.exception("kv transfer: load of request %s failed unexpectedly", job.request_id)
            else:
                logger.warning("kv transfer: load of request %s from %s:%d failed (%s): %s", job.request_id,
                               remote.host, remote.port, reason, exc)
            if self.metrics is not None:
                self.metrics.record_failure(reason)
            if peer is not None and reason in ("peer_error", "timeout", "post_error", "closed"):
                peers.forget(peer.engine_id)  # it may have restarted: handshake afresh next time
            elif peer is not None:
                self._notify(peer.agent_name, remote.request_id)
            return _LoadResult(job.request_id, False, str(exc))
        if self.metrics is not None:
            wall = handle.duration_s or 0.0
            self.metrics.record_transfer(handle.num_bytes, handle.num_blocks, handle.transfer_s or wall, wall)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("kv transfer: request %s pulled %d blocks (%d descriptors) in %.2f ms (%.2f ms NIXL): "
                         "remote %s -> local %s", job.request_id, handle.num_blocks, handle.num_descriptors,
                         (handle.duration_s or 0.0) * 1e3, (handle.transfer_s or 0.0) * 1e3,
                         list(job.remote_block_ids), list(job.local_block_ids))
        return _LoadResult(job.request_id, True)

    @staticmethod
    def _check_lease(remote: RemotePrefill, when: str) -> None:
        if remote.lease_expires_at is not None and time.time() >= remote.lease_expires_at:
            raise KVTransferError(f"the prefill engine's lease on the blocks expired {when}", reason="lease_expired")

    def _submit_notice(self, remote: RemotePrefill) -> None:
        with self._submit_lock:
            if self._closed or self._executor is None:
                return
            self._executor.submit(self._notice, remote)

    def _notice(self, remote: RemotePrefill) -> None:
        """Tell an owner we will not read its blocks (load thread; best effort: the lease expires anyway)."""
        assert self._peers is not None
        try:
            peer = self._peers.get(remote.host, remote.port, remote.engine_id)
        except KVTransferError as exc:
            logger.debug("kv transfer: could not reach %s:%d to release request %s: %s", remote.host, remote.port,
                         remote.request_id, exc)
            return
        self._notify(peer.agent_name, remote.request_id)

    def _notify(self, agent_name: str, remote_request_id: str) -> None:
        assert self.transport is not None
        try:
            self.transport.send_notification(agent_name, format_notification(remote_request_id, 0))
        except KVTransferError as exc:
            logger.debug("kv transfer: could not notify %s: %s", agent_name, exc)


def num_tokens_to_load(request: Request) -> int:
    """Tokens whose KV a decode engine pulls: all but the last known one before the first local step (the
    whole prompt when the prefill's first token came with the request, else all but the prompt's last)."""
    return request.num_prompt_tokens - 1 + request.num_preseeded_tokens


def block_range(num_tokens: int, block_size: int, num_local_blocks: int) -> range:
    """Block indices a decode engine pulls for the KV of its first ``num_tokens`` tokens: from its local
    prefix hits up to the block holding token ``num_tokens - 1``."""
    return range(num_local_blocks, -(-num_tokens // block_size))


def first_token_params(request: Request) -> dict[str, Any]:
    """The exported request's first sampled token (and its logprobs, when asked), for the decode side to
    stream at once and continue from instead of sampling it again."""
    if not request.output_token_ids:
        return {}
    out: dict[str, Any] = {"first_token_id": request.output_token_ids[0]}
    if request.output_logprobs:
        out["first_token_logprobs"] = {str(t): lp for t, lp in request.output_logprobs[0].items()}
    return out
