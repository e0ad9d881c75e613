"""A thin, typed wrapper over NIXL for moving paged KV blocks between two engines.

The decode engine pulls (NIXL READ) blocks out of the prefill engine's registered ``kv_buffer`` straight into
its own. Both buffers follow the block-major layout pinned in ``docs/interfaces.md``
(``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``): block ``b`` with every layer, K and V, is
the ``bytes_per_block_all_layers`` bytes at ``b * bytes_per_block_all_layers``, so a run of consecutive block ids
on both sides is one descriptor.

NOTE: this module talks to NIXL's pybind layer (``<package>._api.nixlBind``) rather than the ``nixl_agent``
Python class, because that class hard-codes the progress thread's poll delay to 0, which makes the UCX
progress thread busy-spin (~0.5-0.8 of a core per idle engine, measured here): on a 2-core machine that is a
core taken from the model. With a delay >= 1 ms the thread sleeps in poll() on UCX's event fd and still wakes
at once for incoming work, so idle cost drops to ~3% of a core.

NOTE: a reader needs no progress thread, and is better off without one. Over UCX's ``cma`` transport a READ is
copied synchronously inside ``postXferReq``, holding the UCX worker's spin lock; a progress thread that wakes
meanwhile spins on that lock until the copy ends (measured with ``perf``: as much CPU spinning as copying). The
READ is no faster without it (alternating A/B in real workers), but on a machine with few cores that spinning
core is taken from the engine and everything else. Without the thread, the caller's own calls (``poll``,
``poll_notifications``) progress the worker.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import numpy as np
import torch

from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.kvtransfer.blocks import (
    block_descs,
    check_buffer,
    check_range,
    check_same_blocks,
    coalesce_runs,
    region_descs,
)
from tandem.kvtransfer.errors import KVTransferError, KVTransferUnavailable
from tandem.kvtransfer.metrics import KVTransferMetrics

logger = logging.getLogger(__name__)

NIXL_MODULES = ("nixl._api", "nixl_cu13._api")
INSTALL_HINT = "pip install nixl-cu13==1.5.1"

TransferState = Literal["pending", "done", "failed", "released"]
DescriptorMode = Literal["prepped", "exact"]

def load_nixl() -> ModuleType:
    """Import NIXL's Python API lazily: ``nixl._api`` first, then ``nixl_cu13._api``.

    Raises:
        KVTransferUnavailable: neither imports (the message names what to install).
    """
    failures = []
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:  # noqa: PERF203 - two tries at most
            failures.append(f"{name}: {exc}")
    raise KVTransferUnavailable(
        "NIXL is not importable (" + "; ".join(failures) + f"). Install it with `{INSTALL_HINT}` "
        "(or `pip install nixl` for a CUDA 12 build)."
    )


def ucx_settings(transports: str | None, device_type: str) -> dict[str, str]:
    """The UCX variables to set while this agent's UCX context is created.

    * ``UCX_TLS`` = ``transports`` when given.
    * For a KV cache in GPU memory, ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y`` unless the environment already sets it.
      Decode workers pull (READ = UCX GET), and UCX's ``cuda_ipc`` transport turns GET off where it finds no
      NVLink (a single GPU, PCIe-only GPUs): GETs of GPU memory then fall back to software emulation over TCP,
      staged through the host. Measured on one H100 between two processes: 0.5 GB/s that way, 200-1,100 GB/s
      with GET over CUDA IPC (``benchmarks/kv_transfer_raw.py --device cuda``).
    """
    settings = {"UCX_TLS": transports} if transports is not None else {}
    if device_type == "cuda" and "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in os.environ:
        settings["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] = "y"
    return settings


@contextlib.contextmanager
def _ucx_env(settings: Mapping[str, str]) -> Iterator[None]:
    """Set these environment variables while the UCX context is created, then restore their previous values.

    UCX reads its configuration from the environment once, when NIXL creates the UCX backend; NIXL's own
    ``engine_config`` backend parameter splits on commas, so it cannot carry a list such as ``tcp,cma``.
    """
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(slots=True)
class TransferHandle:
    """One posted READ of KV blocks. Always pass it to ``NixlKVTransport.release`` when done with it."""

    remote_agent: str
    num_blocks: int
    num_bytes: int
    num_descriptors: int  # after coalescing: one per run of consecutive block ids
    notif: bytes | None
    started_at: float  # time.monotonic() when start_read began building the request
    state: TransferState = "pending"
    finished_at: float | None = None
    error: str | None = None
    transfer_s: float | None = None  # NIXL's own timing of the READ, post -> completion (None: not done, or none)
    _xfer: int | None = field(default=None, repr=False)

    @property
    def duration_s(self) -> float | None:
        """Seconds on this process's clock from starting to build the READ to seeing it complete (None until
        done): ``transfer_s`` plus creating the NIXL request and any wait for the GIL on either side of it."""
        return None if self.finished_at is None else self.finished_at - self.started_at


class NixlKVTransport:
    """Registers one engine's ``kv_buffer`` with NIXL (UCX backend) and READs blocks from remote engines.

    Args:
        kv_buffer: the engine's whole KV cache, contiguous, shape ``layout.shape``, on CPU (DRAM) or CUDA.
        layout: its ``KVCacheLayout``.
        agent_name: this agent's name; must be unique among the peers (include the engine id).
        ucx_transports: a ``UCX_TLS`` value, e.g. ``"tcp,cma"``; None keeps UCX's default (``all``), which on
            one host picks ``cma`` (process_vm_readv, zero-copy) for READs and ``tcp`` for control messages.
            A KV cache on a GPU also has UCX's GET over CUDA IPC turned on (see ``ucx_settings``).
        metrics: optional ``KVTransferMetrics`` to record completed/failed transfers into.
        descriptor_mode: ``"exact"`` (default) builds each transfer from exact coalesced regions
            (``createXferReq``); ``"prepped"`` prepares per-block descriptor lists once (local at start-up,
            remote on first use of a peer: ``num_blocks`` entries each) and builds transfers from block ids.
        progress_thread: run NIXL's progress thread (default). An owner whose peers READ from it needs one (it
            answers connection set-up and receives notifications while the engine is busy); a pure reader should
            pass False (see the module note) and is progressed by its own ``poll``/``wait`` calls.
        progress_delay_us: the NIXL progress thread's poll timeout (rounded up to whole ms by NIXL).
        backend_params: extra UCX backend parameters (e.g. ``{"num_threads": "2"}``), passed to NIXL as is.

    NOTE: all NIXL calls are serialised by one lock, so the object may be shared between threads.
    """

    def __init__(
        self,
        kv_buffer: torch.Tensor,
        layout: KVCacheLayout,
        agent_name: str,
        ucx_transports: str | None = None,
        *,
        metrics: KVTransferMetrics | None = None,
        descriptor_mode: DescriptorMode = "exact",
        progress_thread: bool = True,
        progress_delay_us: int = 1000,
        backend_params: Mapping[str, str] | None = None,
    ) -> None:
        check_buffer(kv_buffer, layout)
        if descriptor_mode not in ("prepped", "exact"):
            raise ValueError(f"descriptor_mode: must be 'prepped' or 'exact', got {descriptor_mode!r}")
        self.layout = layout
        self.agent_name = agent_name
        self.descriptor_mode: DescriptorMode = descriptor_mode
        self.progress_thread = progress_thread
        self._metrics = metrics
        self._buffer = kv_buffer  # keep the memory alive while it is registered
        self._device_id = 0 if kv_buffer.device.type == "cpu" else int(kv_buffer.device.index or 0)
        self._lock = threading.RLock()
        self._closed = False
        self._live: dict[int, TransferHandle] = {}  # id(handle) -> handle with an unreleased NIXL request
        self._unreleasable: list[int] = []  # NIXL requests that refused release (still active); retried on close
        self._remote_agents: set[str] = set()
        self._remote_prepped: dict[tuple[str, int, KVCacheLayout], int] = {}
        self._reg_dlist = None
        self._local_prepped: int | None = None

        api = load_nixl()
        bind = api.nixlBind
        self._bind = bind
        self._mem_type = bind.DRAM_SEG if kv_buffer.device.type == "cpu" else bind.VRAM_SEG
        try:
            config = bind.nixlAgentConfig()
            config.useProgThread = progress_thread
            config.useListenThread = False
            config.pthrDelay = int(progress_delay_us)
            config.lthrDelay = 100_000
            config.syncMode = bind.NIXL_THREAD_SYNC_NONE  # our lock serialises every call
            # NIXL times every transfer itself (post -> completion, in C++, two clock reads), as vLLM's connector
            # reports transfer time: this process's Python clock would add waits for the GIL to it.
            config.captureTelemetry = True
            self._agent = bind.nixlAgent(agent_name, config)
            if "UCX" not in self._agent.getAvailPlugins():
                raise KVTransferUnavailable(f"NIXL has no UCX plugin; reinstall it (`{INSTALL_HINT}`)")
            with _ucx_env(ucx_settings(ucx_transports, kv_buffer.device.type)):
                # "peer" error handling: a dead peer fails its transfers instead of hanging them.
                params = {"ucx_error_handling_mode": "peer", **(backend_params or {})}
                self._backend = self._agent.createBackend("UCX", params)
        except KVTransferUnavailable:
            raise
        except Exception as exc:
            raise KVTransferUnavailable(
                f"could not start NIXL's UCX backend (UCX_TLS={ucx_transports or 'default'}): {exc}"
            ) from exc
        self._backends = [self._backend]
        try:
            self.base_address = int(kv_buffer.data_ptr())
            self._reg_dlist = bind.nixlRegDList(
                self._mem_type, [(self.base_address, layout.total_bytes, self._device_id, "")]
            )
            self._agent.registerMem(self._reg_dlist, self._backends)
            if descriptor_mode == "prepped":
                local = bind.nixlXferDList(self._mem_type, block_descs(layout, self.base_address, self._device_id))
                self._local_prepped = int(self._agent.prepXferDlist(bind.NIXL_INIT_AGENT, local, self._backends))
            self._metadata = bytes(self._agent.getLocalMD())
        except Exception as exc:
            self.close()
            raise KVTransferUnavailable(f"could not register the KV buffer with NIXL: {exc}") from exc

    # ----------------------------------------------------------------------------------------- peers
    def agent_metadata(self) -> bytes:
        """This agent's NIXL metadata (connection info and the registered buffer), for the handshake."""
        return self._metadata

    def add_remote_agent(self, metadata: bytes) -> str:
        """Load a peer's metadata (from its handshake); returns the peer's agent name."""
        with self._lock:
            self._check_open()
            try:
                name = self._agent.loadRemoteMD(metadata)
            except Exception as exc:
                raise KVTransferError(f"could not load remote agent metadata: {exc}", reason="handshake") from exc
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._remote_agents.add(name)
            return name

    def remove_remote_agent(self, name: str) -> None:
        """Forget a peer: release its prepared descriptors and disconnect. Unknown names are ignored."""
        with self._lock:
            if self._closed or name not in self._remote_agents:
                return
            # Requests towards the peer must go before its metadata does.
            for handle in [h for h in self._live.values() if h.remote_agent == name]:
                if handle.state == "pending":
                    self._fail(handle, f"remote agent {name} was removed while the READ was in flight", "peer_error")
                self.release(handle)
            for key in [key for key in self._remote_prepped if key[0] == name]:
                self._release_dlist(self._remote_prepped.pop(key))
            self._remote_agents.discard(name)
            try:
                self._agent.invalidateRemoteMD(name)
            except Exception as exc:  # the peer may already be gone; the local state is dropped either way
                logger.warning("invalidating remote agent %s failed: %s", name, exc)

    @property
    def remote_agents(self) -> frozenset[str]:
        """Names of the peers currently loaded."""
        return frozenset(self._remote_agents)

    # ------------------------------------------------------------------------------------- transfers
    def start_read(
        self,
        remote_agent: str,
        remote_base_address: int,
        remote_layout: KVCacheLayout,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notif: bytes | None = None,
    ) -> TransferHandle:
        """Post a READ of ``remote_block_ids`` (every layer, K and V) into ``local_block_ids``.

        Runs where both remote and local ids are consecutive move as one region. When the
        READ completes NIXL delivers ``notif`` (e.g. ``b"done:<request_id>"``) to the owner.

        Raises:
            ValueError: mismatched or out-of-range block ids, or a remote layout whose blocks differ.
            KVTransferError: the peer is unknown, or NIXL refused to create or post the transfer.
        """
        check_same_blocks(self.layout, remote_layout)
        remote_starts, local_starts, lengths = coalesce_runs(remote_block_ids, local_block_ids)
        check_range("remote", remote_starts, lengths, remote_layout.num_blocks)
        check_range("local", local_starts, lengths, self.layout.num_blocks)
        num_blocks = sum(lengths)
        handle = TransferHandle(
            remote_agent=remote_agent,
            num_blocks=num_blocks,
            num_bytes=num_blocks * self.layout.bytes_per_block_all_layers,
            num_descriptors=len(lengths),
            notif=notif,
            started_at=time.monotonic(),
        )
        with self._lock:
            self._check_open()
            if remote_agent not in self._remote_agents:
                raise KVTransferError(f"unknown remote agent {remote_agent!r}: handshake first", reason="handshake")
            try:
                if self.descriptor_mode == "prepped":
                    xfer = self._make_prepped(remote_agent, remote_base_address, remote_layout, remote_block_ids, local_block_ids)
                else:
                    xfer = self._make_exact(remote_agent, remote_base_address, remote_layout, remote_starts, local_starts, lengths)
            except Exception as exc:
                self._record_failure("post_error")
                raise KVTransferError(f"could not create READ from {remote_agent}: {exc}", reason="post_error") from exc
            handle._xfer = xfer
            self._live[id(handle)] = handle
            try:
                status = self._agent.postXferReq(xfer, notif or b"")
            except Exception as exc:
                status = exc
            if status == self._bind.NIXL_SUCCESS:
                self._finish(handle)
            elif status != self._bind.NIXL_IN_PROG:
                self._fail(handle, f"posting READ from {remote_agent} failed: {status}", "post_error")
                self.release(handle)
                raise KVTransferError(handle.error or "", reason="post_error")
        return handle

    def _make_prepped(
        self,
        remote_agent: str,
        remote_base_address: int,
        remote_layout: KVCacheLayout,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
    ) -> int:
        key = (remote_agent, int(remote_base_address), remote_layout)
        remote_prepped = self._remote_prepped.get(key)
        if remote_prepped is None:
            remote = self._bind.nixlXferDList(
                self._mem_type, block_descs(remote_layout, int(remote_base_address), self._device_id)
            )
            remote_prepped = int(self._agent.prepXferDlist(remote_agent, remote, self._backends))
            self._remote_prepped[key] = remote_prepped
        local_idx = np.asarray(local_block_ids, dtype=np.int32)
        remote_idx = np.asarray(remote_block_ids, dtype=np.int32)
        return int(
            self._agent.makeXferReq(
                self._bind.NIXL_READ,
                self._local_prepped,
                local_idx,
                remote_prepped,
                remote_idx,
                b"",
                self._backends,
            )
        )

    def _make_exact(
        self,
        remote_agent: str,
        remote_base_address: int,
        remote_layout: KVCacheLayout,
        remote_starts: list[int],
        local_starts: list[int],
        lengths: list[int],
    ) -> int:
        local = self._bind.nixlXferDList(
            self._mem_type, region_descs(self.layout, self.base_address, local_starts, lengths, self._device_id)
        )
        remote = self._bind.nixlXferDList(
            self._mem_type, region_descs(remote_layout, int(remote_base_address), remote_starts, lengths, self._device_id)
        )
        return int(self._agent.createXferReq(self._bind.NIXL_READ, local, remote, remote_agent, b"", self._backends))

    def poll(self, handle: TransferHandle) -> Literal["done", "pending"]:
        """Progress and check a transfer without blocking.

        Raises:
            KVTransferError: the transfer failed (e.g. the peer died) or the handle was released.
        """
        if handle.state == "done":
            return "done"
        if handle.state == "failed":
            raise KVTransferError(handle.error or "transfer failed", reason="peer_error")
        if handle.state == "released" or handle._xfer is None:
            raise KVTransferError("transfer handle already released", reason="closed")
        with self._lock:
            if self._closed:
                raise KVTransferError("transport closed", reason="closed")
            try:
                status = self._agent.getXferStatus(handle._xfer)
            except Exception as exc:
                status = exc
            if status == self._bind.NIXL_SUCCESS:
                self._finish(handle)
                return "done"
            if status == self._bind.NIXL_IN_PROG:
                return "pending"
            self._fail(handle, f"READ from {handle.remote_agent} failed: {status}", "peer_error")
        raise KVTransferError(handle.error or "transfer failed", reason="peer_error")

    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        """Poll until the transfer is done.

        Raises:
            KVTransferError: it failed, or did not finish within ``timeout_s`` (reason ``"timeout"``).
        """
        deadline = time.monotonic() + timeout_s
        pause = 0.0
        while self.poll(handle) == "pending":
            if time.monotonic() >= deadline:
                self._record_failure("timeout")
                handle.state = "failed"
                handle.error = f"READ from {handle.remote_agent} did not finish within {timeout_s:.3f} s"
                raise KVTransferError(handle.error, reason="timeout")
            # Spin briefly (small transfers finish in tens of us), then back off. Without a progress thread
            # only these polls move a transfer that did not finish inside the post, so they stay frequent.
            if pause:
                time.sleep(pause)
            pause = min(max(pause * 2, 5e-5), 1e-3 if self.progress_thread else 1e-4)

    def read_blocks(
        self,
        remote_agent: str,
        remote_base_address: int,
        remote_layout: KVCacheLayout,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notif: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> TransferHandle:
        """``start_read`` + ``wait`` + ``release`` in one call (the handle is released even on failure)."""
        handle = self.start_read(remote_agent, remote_base_address, remote_layout, remote_block_ids, local_block_ids, notif)
        try:
            self.wait(handle, timeout_s)
        finally:
            self.release(handle)
        return handle

    def release(self, handle: TransferHandle) -> None:
        """Free the NIXL request behind ``handle`` (idempotent). An active READ is cancelled by NIXL; one that
        cannot be cancelled yet is kept and released again on ``close``."""
        with self._lock:
            xfer = handle._xfer
            handle._xfer = None
            self._live.pop(id(handle), None)
            if handle.state == "pending":
                handle.state = "released"
            if xfer is None or self._closed:
                return
            self._release_xfer(xfer)

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as ``(remote agent name, message)``: the owner side
        learns here that a reader finished (e.g. ``b"done:<request_id>"``) and can free its lease."""
        with self._lock:
            if self._closed:
                return []
            try:
                notifs = self._agent.getNotifs({}, self._backends)
            except Exception as exc:
                raise KVTransferError(f"could not fetch NIXL notifications: {exc}") from exc
        return [(str(agent), bytes(msg)) for agent, messages in notifs.items() for msg in messages]

    def send_notification(self, remote_agent: str, message: bytes) -> None:
        """Send a standalone notification to a loaded peer (not bound to a transfer)."""
        with self._lock:
            self._check_open()
            try:
                self._agent.genNotif(remote_agent, message, self._backends)
            except Exception as exc:
                raise KVTransferError(f"could not notify {remote_agent}: {exc}") from exc

    @property
    def num_live_transfers(self) -> int:
        """Transfers posted and not yet released (a leak check for callers and tests)."""
        return len(self._live)

    # -------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Release every transfer, prepared list and peer, deregister the buffer and stop the agent.
        Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            agent = getattr(self, "_agent", None)
            if agent is not None:
                for handle in list(self._live.values()):
                    self.release(handle)
                for xfer in self._unreleasable:
                    self._release_xfer(xfer, keep=False)
                self._unreleasable.clear()
                for name in list(self._remote_agents):
                    self.remove_remote_agent(name)
                if self._local_prepped is not None:
                    self._release_dlist(self._local_prepped)
                    self._local_prepped = None
                if self._reg_dlist is not None:
                    try:
                        agent.deregisterMem(self._reg_dlist, self._backends)
                    except Exception as exc:
                        logger.warning("deregistering the KV buffer failed: %s", exc)
                    self._reg_dlist = None
            self._closed = True
            # Dropping the agent joins its progress thread and frees UCX.
            self._agent = None

    def __enter__(self) -> NixlKVTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -------------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError("transport closed", reason="closed")

    def _finish(self, handle: TransferHandle) -> None:
        handle.state = "done"
        handle.finished_at = time.monotonic()
        handle.transfer_s = self._telemetry_seconds(handle._xfer)
        if self._metrics is not None:
            wall = handle.finished_at - handle.started_at
            self._metrics.record_transfer(handle.num_bytes, handle.num_blocks, handle.transfer_s or wall, wall)

    def _telemetry_seconds(self, xfer: int | None) -> float | None:
        """NIXL's own post -> completion time of a finished request, or None where it has none."""
        if xfer is None:
            return None
        try:
            micros = self._agent.getXferTelemetry(xfer).xferDuration
        except Exception:  # noqa: BLE001 - telemetry is an extra: a request without it is still done
            return None
        return micros / 1e6 if micros > 0 else None

    def _fail(self, handle: TransferHandle, error: str, reason: str) -> None:
        handle.state = "failed"
        handle.error = error
        self._record_failure(reason)

    def _record_failure(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.record_failure(reason)

    def _release_xfer(self, xfer: int, keep: bool = True) -> None:
        try:
            status = self._agent.releaseXferReq(xfer)
        except Exception as exc:
            status = exc
        if status != self._bind.NIXL_SUCCESS:
            logger.warning("NIXL could not release transfer 0x%x yet: %s", xfer, status)
            if keep:
                self._unreleasable.append(xfer)

    def _release_dlist(self, dlist: int) -> None:
        try:
            self._agent.releasedDlistH(dlist)
        except Exception as exc:
            logger.warning("releasing a prepared descriptor list failed: %s", exc)
