"""Running the synchronous engine on its own thread, for an asyncio server.

NOTE: the engine thread is the only one that touches the engine. The event loop talks to it through
a command queue (add, abort) and gets deltas back with ``call_soon_threadsafe``, so HTTP handling
never waits on a forward pass and the engine never waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import EngineStats, LLMEngine
from tandem.engine.outputs import RequestDelta
from tandem.engine.sampling_params import SamplingParams
from tandem.protocol.kv_transfer import KVTransferParams
from tandem.runtime import freeze_startup_heap

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (failed to load, or crashed)."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: KVTransferParams | dict | None
    arrival_time: float
    sink: Callable[[RequestDelta | BaseException], None]  # called on the event loop (the request's queue)
    accepted: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Call:
    fn: Callable[[LLMEngine], object]
    done: asyncio.Future


_STOP = object()
_WAKE = object()  # only wakes the engine thread (see ``AsyncEngine.wake``)


class AsyncEngine:
    """Owns the engine thread. ``start()`` loads the model there; ``generate()`` streams deltas."""

    def __init__(self, config: EngineConfig, engine_factory: Callable[[EngineConfig], LLMEngine] | None = None):
        self.config = config
        self._factory = engine_factory or (lambda cfg: LLMEngine(cfg))
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[str, Callable] = {}
        self.ready: asyncio.Event | None = None  # created in start(), on the running loop
        self.error: BaseException | None = None
        self.stats: EngineStats | None = None
        # Called on the engine thread after each step with the drained KV events.
        self.kv_event_listeners: list[Callable[[list], None]] = []
        # Called on the engine thread after each step (connector housekeeping, lease expiry...).
        self.step_hooks: list[Callable[[LLMEngine], None]] = []

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self.ready.is_set() and self.error is None

    async def wait_ready(self, timeout: float | None = None) -> None:
        assert self.ready is not None
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_transfer_params: KVTransferParams | dict | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Submit a request and yield its deltas. Leaving the iterator early aborts the request."""
        if not self.is_ready:
            raise EngineDeadError(f"engine is not ready: {self.error or 'still loading'}")
        deltas: asyncio.Queue = asyncio.Queue()
        loop = self._loop
        assert loop is not None
        accepted = loop.create_future()

        self._commands.put(_Add(request_id, prompt_token_ids, params, kv_transfer_params, time.monotonic(),
                                deltas.put_nowait, accepted))
        await accepted  # raises the engine's ValueError for an invalid request
        remaining = params.n
        try:
            while remaining:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def wake(self) -> None:
        """Wake the engine thread now rather than at its next poll; safe from any thread (e.g. when a KV pull
        lands on the connector's thread), without a round trip through the event loop."""
        self._commands.put(_WAKE)

    async def call(self, fn: Callable[[LLMEngine], object]):
        """Run ``fn(engine)`` on the engine thread (between steps) and return its result."""
        assert self._loop is not None
        done = self._loop.create_future()
        self._commands.put(_Call(fn, done))
        return await done

    # ---- the engine thread ---------------------------------------------------------------------
    def _resolve(self, fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
        def apply() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(apply)

    def _run(self) -> None:
        assert self._loop is not None and self.ready is not None
        try:
            self.engine = self._factory(self.config)
            self.stats = self.engine.stats()
        except BaseException as exc:  # reported through /health and every request
            logger.error("engine failed to start: %s", exc)
            self.error = exc
            self._loop.call_soon_threadsafe(self.ready.set)
            return
        freeze_startup_heap("engine")
        self._loop.call_soon_threadsafe(self.ready.set)
        engine = self.engine
        idle = True
        while True:
            # Block on the command queue while nothing can run; while blocks are held for, or being
            # pulled from, a remote engine, wake often enough to do that housekeeping.
            try:
                if idle:
                    command = self._commands.get(timeout=0.005 if engine.scheduler.has_external_work() else 0.1)
                else:
                    command = self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all(EngineDeadError("engine is shutting down"))
                    return
                if command is not _WAKE:
                    self._handle(engine, command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            early = engine.take_preseeded_deltas()  # first tokens handed in: out before the next forward pass
            if early:
                self.stats = engine.stats()
                self._deliver(engine, early)
            deltas = []
            idle = True  # NOTE: only a step that computed tokens keeps the loop from blocking
            try:
                if engine.scheduler.has_work():
                    deltas = engine.step()
                    idle = engine.last_step_num_tokens == 0
            except Exception as exc:  # a bug in a step must not kill the server: fail what was running
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            for hook in self.step_hooks:
                hook(engine)
            events = engine.take_kv_events()
            if events:
                for listener in self.kv_event_listeners:
                    listener(events)
            # Stats first, then the outputs: a client that reads /metrics right after its response
            # must see the state that response left behind (e.g. blocks held under a lease).
            self.stats = engine.stats()
            self._deliver(engine, deltas)
            # Busy or idle (an engine that never idles would hand out pages untouched for minutes), but not while
            # a READ lands in this engine's blocks: a pass would compete with it for memory bandwidth.
            if not engine.scheduler.has_external_work():
                engine.keep_kv_cache_warm(time.monotonic())

    def _handle(self, engine: LLMEngine, command) -> None:
        if isinstance(command, _Add):
            try:
                engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                   command.kv_transfer_params, command.arrival_time)
            except ValueError as exc:
                self._resolve(command.accepted, exc=exc)
                return
            self._sinks[command.request_id] = command.sink
            self._resolve(command.accepted, True)
        elif isinstance(command, _Abort):
            engine.abort_request(command.request_id)
            self._sinks.pop(command.request_id, None)
        elif isinstance(command, _Call):
            try:
                self._resolve(command.done, command.fn(engine))
            except Exception as exc:
                self._resolve(command.done, exc=exc)

    def _deliver(self, engine: LLMEngine, deltas: list) -> None:
        """Hand a step's deltas to their requests' queues in one hop to the event loop (one wake-up per step, not
        one per request: 32 streams cost 32 self-pipe writes and loop callbacks a step otherwise)."""
        batch = [(sink, delta) for delta in deltas if (sink := self._sinks.get(delta.request_id)) is not None]
        if batch:
            self._send(batch)
        self._forget_finished(engine)

    def _send(self, batch: list[tuple[Callable, RequestDelta | BaseException]]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_put_all, batch)

    def _forget_finished(self, engine: LLMEngine) -> None:
        for rid in [r for r in self._sinks if not engine.is_active(r)]:
            del self._sinks[rid]

    def _fail_all(self, exc: BaseException) -> None:
        assert self.engine is not None
        self._send([(sink, exc) for sink in self._sinks.values()])
        for rid in list(self._sinks):
            self.engine.abort_request(rid)
        self._sinks.clear()


def _put_all(batch: list[tuple[Callable, RequestDelta | BaseException]]) -> None:
    for put, item in batch:
        put(item)
