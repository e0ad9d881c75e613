"""The scheduler: policy only. Decides which requests run this step and how many tokens each gets.

NOTE: there are no prefill or decode phases. Each running request needs ``num_tokens -
num_computed_tokens`` more tokens computed; the step's token budget is shared among them, a long
prompt takes a chunk, and a decode step is simply a request that needs one token. Requests waiting
for remote KV (disaggregated decode) are parked while the rest of the batch keeps going.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from tandem.engine.config import SchedulerConfig, SpeculativeConfig
from tandem.engine.core.kv_cache_manager import KVCacheManager
from tandem.engine.core.request import Request, RequestStatus
from tandem.engine.spec_decode import propose_ngram


class KVConnectorSchedulerSide(Protocol):
    """The scheduler half of a KV connector (disaggregated prefill/decode)."""

    def get_num_new_matched_tokens(self, request: Request, num_local_computed_tokens: int) -> int:
        """Tokens (beyond the local prefix hits) whose KV will be loaded from a remote engine."""

    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_local_blocks: int,
                                 num_external_tokens: int) -> None:
        """Blocks were allocated for the external tokens: start loading them."""

    def get_finished_recving(self) -> dict[str, bool]:
        """request_id -> whether its remote KV arrived intact (False: the load failed)."""

    def load_failure_error(self, request_id: str) -> str | None:
        """After a failed load: the error to end the request with, or None to recompute the prompt locally."""

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """A request finished: (hold its blocks for a remote reader?, kv_transfer_params to return)."""

    def get_finished_sending(self) -> list[str]:
        """Requests whose held blocks may now be freed (read by the peer, or lease expired)."""


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    block_ids: list[int | None]  # None: released outside a sliding window (KVCacheManager.release_outside_window)
    # Speculative drafts verified this step (num_tokens == 1 + len(spec_token_ids)); empty otherwise.
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the runner produced for the scheduled requests that sample this step."""

    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> token id
    # Requests that verified drafts: request_id -> the tokens to append (accepted drafts + one sampled).
    spec_sampled: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[dict[int, float] | None]] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[dict[int, float] | None]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestUpdate:
    """One request's progress after a step, for the output processor."""

    request: Request
    new_token_ids: list[int]
    finished: bool
    kv_transfer_params: dict | None = None


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        connector: KVConnectorSchedulerSide | None = None,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = config
        self.speculative = speculative
        # Speculative decoding counters (vLLM's spec_decode metrics).
        self.num_spec_drafts = 0
        self.num_spec_draft_tokens = 0
        self.num_spec_accepted_tokens = 0
        self.kv = kv_manager
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests finished but whose blocks are held for a remote reader: request_id -> request.
        self.held: dict[str, Request] = {}
        self.remote_waiting: dict[str, Request] = {}
        # Aborted while their remote KV was loading: blocks freed once the connector reports the READ over.
        self.aborted_loading: dict[str, Request] = {}
        # Ended by the scheduler with an error (remote KV load failed, policy "fail"): (request, message).
        self.failed: list[tuple[Request, str]] = []
        self.num_preemptions = 0

    # ---- admission -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt: {request.num_tokens} tokens leave no room to generate within "
                f"max_model_len={self.config.max_model_len}"
            )
        self.requests[request.request_id] = request
        if request.grammar is not None and not request.grammar.ready:
            request.status = RequestStatus.WAITING_FOR_GRAMMAR
        self.waiting.append(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.remote_waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.remote_waiting or self.held or self.aborted_loading)

    def has_external_work(self) -> bool:
        """Blocks held for a remote reader, requests waiting for remote KV or for a grammar being compiled
        on another thread: needs polling."""
        return bool(self.remote_waiting or self.held or self.aborted_loading) or any(
            r.status == RequestStatus.WAITING_FOR_GRAMMAR for r in self.waiting)

    def take_failed(self) -> list[tuple[Request, str]]:
        """Requests the scheduler ended with an error since the last call, with the error message."""
        failed, self.failed = self.failed, []
        return failed

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._poll_connector()
        self._fail_broken_grammars()

        # 1. Running requests first (oldest first), preempting the newest when blocks run out.
        scheduled_ids: set[str] = set()
        long_prefills = 0  # requests given tokens this step with a long prompt still to compute
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget)
            if num_new <= 0 or (self._is_long(remaining) and long_prefills >= self.config.max_long_partial_prefills):
                i += 1
                continue
            long_prefills += self._is_long(remaining)
            drafts = self._propose(request, budget) if num_new == 1 else []
            if drafts and self.kv.allocate_slots(request, 1 + len(drafts)) is not None:
                out.scheduled.append(ScheduledRequest(request, 1 + len(drafts), self.kv.block_ids(request.request_id),
                                                      drafts))
                scheduled_ids.add(request.request_id)
                budget -= 1 + len(drafts)
                i += 1
                continue
            while True:
                if self.kv.allocate_slots(request, num_new) is not None:
                    break
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # the request preempted itself; nothing later can fit either
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_ids(request.request_id)))
            scheduled_ids.add(request.request_id)
            budget -= num_new
            i += 1

        # 2. Admit waiting requests while there is budget, room and no preemption this step.
        skipped: list[Request] = []
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if not self._group_ready(request) or not self._grammar_ready(request):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_computed = self.kv.get_computed_blocks(request, record=False)
            num_external = 0
            if self.connector is not None and request.kv_transfer_params and request.num_computed_tokens == 0:
                num_external = self.connector.get_num_new_matched_tokens(request, num_computed)
            if num_external:
                new_blocks = self.kv.allocate_slots(request, num_external, computed_blocks)
                if new_blocks is None:
                    break
                self.waiting.popleft()
                self.kv.record_lookup(request, num_computed)
                request.num_computed_tokens = num_computed
                request.num_cached_tokens = num_computed
                request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                self.remote_waiting[request.request_id] = request
                self.connector.update_state_after_alloc(  # type: ignore[union-attr]
                    request, self.kv.block_ids(request.request_id), len(computed_blocks), num_external
                )
                continue
            num_new = request.num_tokens - num_computed - request.num_computed_tokens
            if self._is_long(num_new) and long_prefills >= self.config.max_long_partial_prefills:
                skipped.append(self.waiting.popleft())  # a shorter prompt behind it may go now
                continue
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.popleft()
            if request.num_computed_tokens == 0:
                self.kv.record_lookup(request, num_computed)
                request.num_cached_tokens = num_computed
            request.num_computed_tokens += num_computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_ids(request.request_id)))
            long_prefills += self._is_long(request.num_tokens - request.num_computed_tokens)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return out

    def _is_long(self, tokens_to_compute: int) -> bool:
        return tokens_to_compute >= self.config.long_prefill_tokens

    def _propose(self, request: Request, budget: int) -> list[int]:
        """Draft tokens for a decoding request, or [] when speculation is off or cannot apply to it."""
        spec = self.speculative
        if spec is None or (spec.disable_by_batch_size is not None and len(self.running) > spec.disable_by_batch_size):
            return []
        sp = request.sampling_params
        if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
            return []  # NOTE: penalties depend on every earlier token, drafts included; not verified here
        if request.num_output_tokens < sp.min_tokens:
            return []
        # Room for the drafts plus the token sampled after them, within the budget and both length limits.
        k = min(spec.num_speculative_tokens, budget - 1, self.config.max_model_len - request.num_tokens - 1)
        if sp.max_tokens is not None:
            k = min(k, sp.max_tokens - request.num_output_tokens - 1)
        if k < 1:
            return []
        drafts = propose_ngram(request.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max)
        if drafts and request.grammar is not None:
            drafts = request.grammar.valid_prefix(drafts)  # drafts the grammar rejects are cut before verifying
        return drafts

    @staticmethod
    def _grammar_ready(request: Request) -> bool:
        """A structured output request waits (``WAITING_FOR_GRAMMAR``) until its grammar is compiled."""
        if request.grammar is None:
            return True
        if not request.grammar.ready or request.grammar.error:
            return False  # (a broken one is ended by _fail_broken_grammars on the next step)
        if request.status == RequestStatus.WAITING_FOR_GRAMMAR:
            request.status = RequestStatus.WAITING
        return True

    def _fail_broken_grammars(self) -> None:
        """End waiting requests whose grammar failed to compile, with the compiler's error."""
        broken = [r for r in self.waiting if r.grammar is not None and r.grammar.ready and r.grammar.error]
        for request in self.finish_requests([r.request_id for r in broken], RequestStatus.FINISHED_ERROR):
            self.failed.append((request, request.grammar.error))  # type: ignore[union-attr]

    def _group_ready(self, request: Request) -> bool:
        """n > 1 siblings wait until the first sibling's prompt is cached, then share its blocks."""
        if request.group_id is None or not self.kv.enable_caching or request.num_computed_tokens:
            return True
        leader = self.requests.get(request.group_id)
        if leader is None or leader is request or leader.is_finished:
            return True
        return leader.num_computed_tokens >= leader.num_prompt_tokens

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request.request_id)
        # A preempted request may already be in out.scheduled (it was scheduled earlier this step).
        out.scheduled[:] = [s for s in out.scheduled if s.request is not request]

    def _poll_connector(self) -> None:
        if self.connector is None:
            return
        for rid, ok in self.connector.get_finished_recving().items():
            aborted = self.aborted_loading.pop(rid, None)
            if aborted is not None:
                self.kv.free(aborted)  # the READ is over: nothing writes into these blocks any more
                continue
            request = self.remote_waiting.pop(rid, None)
            if request is None:
                continue
            # One load per request: if it is preempted later (or the load failed) it recomputes locally.
            request.kv_transfer_params = None
            if ok:
                # Everything but the last known token arrived (the last prompt token, or the prefill's
                # first output token when it came with the request); the local step computes that one
                # token and samples, exactly as an aggregated engine would.
                request.num_computed_tokens = request.num_tokens - 1
                self.kv.cache_blocks(request, request.num_computed_tokens)
            else:
                # NOTE: start over from a fresh prefix lookup (which finds the local hits again): the
                # blocks the failed READ targeted hold garbage and must not count as computed.
                self.kv.free(request)
                request.num_computed_tokens = 0
                request.num_cached_tokens = 0
                error = self.connector.load_failure_error(rid)
                if error is not None:
                    request.status = RequestStatus.FINISHED_ERROR
                    self.requests.pop(rid, None)
                    self.failed.append((request, error))
                    continue
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
        for rid in self.connector.get_finished_sending():
            request = self.held.pop(rid, None)
            if request is not None:
                self.kv.free(request)

    # ---- after the step ------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, output: ModelRunnerOutput) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        for item in sched.scheduled:
            request = item.request
            if request.is_finished:
                continue  # aborted while the step ran
            if item.spec_token_ids:
                update = self._apply_spec(item, output)
                if update is not None:
                    updates.append(update)
                continue
            request.num_computed_tokens += item.num_tokens
            self.kv.cache_blocks(request, request.num_computed_tokens)
            if request.request_id in output.prompt_logprobs:
                request.prompt_logprobs.extend(output.prompt_logprobs[request.request_id])
            token = output.sampled.get(request.request_id)
            if token is None:
                continue  # a prompt chunk that does not reach the end yet
            rejected = self.append_token(request, token)
            if request.request_id in output.logprobs:
                request.output_logprobs.append(output.logprobs[request.request_id])
            status = rejected or self.check_stop(request, token)
            params = None
            if status is not None:
                params = self._finish(request, status)
            updates.append(RequestUpdate(request, [token], status is not None, params))
        return updates

    def _apply_spec(self, item: ScheduledRequest, output: ModelRunnerOutput) -> RequestUpdate | None:
        """Append a verified step's tokens one by one (stopping where a stop condition hits)."""
        request = item.request
        tokens = output.spec_sampled.get(request.request_id)
        if not tokens:
            return None
        logprobs = output.spec_logprobs.get(request.request_id)
        self.num_spec_drafts += 1
        self.num_spec_draft_tokens += len(item.spec_token_ids)
        self.num_spec_accepted_tokens += len(tokens) - 1
        status = None
        appended: list[int] = []
        for index, token in enumerate(tokens):
            rejected = self.append_token(request, token)
            if logprobs is not None and logprobs[index] is not None:
                request.output_logprobs.append(logprobs[index])
            appended.append(token)
            status = rejected or self.check_stop(request, token)
            if status is not None:
                break
        # Valid KV now covers the last real token and the accepted drafts, i.e. every token but the newest
        # (only the last appended token can be one no draft slot held). Rejected drafts' slots lie past it:
        # the next step overwrites them and nothing caches them.
        request.num_computed_tokens = request.num_tokens - 1
        self.kv.cache_blocks(request, request.num_computed_tokens)
        params = self._finish(request, status) if status is not None else None
        return RequestUpdate(request, appended, status is not None, params)

    @staticmethod
    def append_token(request: Request, token: int) -> RequestStatus | None:
        """Append a generated token and advance the request's grammar over it. Returns FINISHED_ERROR if the
        grammar forbids the token (the sampler masks such tokens, so only a bug gets there), else None."""
        request.append_output_token(token)
        if request.grammar is not None and not request.grammar.accept(token):
            return RequestStatus.FINISHED_ERROR
        return None

    def check_stop(self, request: Request, token: int) -> RequestStatus | None:
        sp = request.sampling_params
        n_out = request.num_output_tokens
        if request.grammar is not None and request.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED  # the structured output is complete (its stop token accepted)
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token == request.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if token in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and n_out >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def _finish(self, request: Request, status: RequestStatus) -> dict | None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        params = None
        hold = False
        if self.connector is not None and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED):
            hold, params = self.connector.request_finished(request, self.kv.block_ids(request.request_id))
        if hold:
            self.held[request.request_id] = request
        else:
            self.kv.free(request)
        self.requests.pop(request.request_id, None)
        return params

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside the step (abort, stop string): their blocks are freed at once,
        except while a remote READ may still write into them (then when the connector reports it over)."""
        done = []
        for rid in request_ids:
            request = self.requests.pop(rid, None)
            if request is None or request.is_finished:
                continue
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            if self.remote_waiting.pop(rid, None) is not None:
                self.aborted_loading[rid] = request
            else:
                if self.connector is not None and request.kv_transfer_params:
                    # Its remote KV was never pulled: tell the prefill engine to drop its lease now.
                    self.connector.request_finished(request, [])
                self.kv.free(request)
            done.append(request)
        return done
