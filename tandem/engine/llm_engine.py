"""The engine: a scheduler, a model runner and output processing, driven one ``step()`` at a time.

NOTE: this module is synchronous and knows nothing of HTTP or asyncio; the server runs it on its own
thread (``async_engine.py``) and the offline ``LLM`` calls ``step()`` in a loop.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core.kv_cache_manager import KVCacheManager
from tandem.engine.core.request import Request, RequestStatus
from tandem.engine.core.scheduler import KVConnectorSchedulerSide, Scheduler
from tandem.engine.detokenizer import DetokenizerState, IncrementalDetokenizer, find_stop
from tandem.engine.model_files import ModelNotFoundError
from tandem.engine.model_runner import ModelRunner, set_threads
from tandem.engine.models.registry import PRESETS, build_model, build_model_skeleton, config_from_hf
from tandem.engine.outputs import RequestDelta
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.structured_output import RequestGrammar, StructuredOutputManager
from tandem.engine.weights import WeightsError, load_config, load_state_dict, prepare
from tandem.protocol.kv_transfer import KVTransferParams

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line naming the problem."""


@dataclass(slots=True)
class _Child:
    """One of the ``n`` samples of a request, with its detokenizer state."""

    parent_id: str
    index: int
    request: Request
    detok: DetokenizerState = field(default_factory=DetokenizerState)
    sent_prompt_logprobs: bool = False
    sent_queue_time: bool = False
    first_token_at: float | None = None  # time.monotonic() when its first token was reported


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


def load_model(config: EngineConfig, progress: bool = True):
    """Load (config, model, tokenizer, model name) for ``config.model``: an id, a path or ``preset:NAME``."""
    name = config.model
    if name and name.startswith("preset:"):
        preset = PRESETS.get(name.split(":", 1)[1])
        if preset is None:
            raise ModelLoadError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        mc = config_from_hf(preset)
        torch.manual_seed(config.seed)
        model = build_model(mc)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return mc, model, None, name
    try:
        resolved, weights_dir = prepare(name)
        mc = config_from_hf(load_config(weights_dir))
        mc.eos_token_id = _all_eos_ids(mc.eos_token_id, weights_dir)
        t0 = time.monotonic()
        model = build_model_skeleton(mc)
        model = model.to_empty(device="cpu")
        state = load_state_dict(weights_dir, keep=model.wants_tensor)
        model.load_hf_state_dict(state)
        del state
        tokenizer = _load_tokenizer(weights_dir)
        if progress:
            print(f"tandem: loaded {resolved.name} ({mc.architecture}, {mc.num_layers} layers) "
                  f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        return mc, model, tokenizer, resolved.name
    except (ModelNotFoundError, WeightsError, ValueError, OSError) as exc:
        raise ModelLoadError(str(exc).splitlines()[0]) from exc


def _all_eos_ids(eos: int | list[int] | None, weights_dir) -> int | list[int] | None:
    """The model's end-of-sequence ids from config.json and generation_config.json together.

    Why: instruct models often end a turn with a token other than the tokenizer's EOS (Gemma 3's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), listed only in generation_config.json; vLLM stops on all of them.
    """
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    path = weights_dir / "generation_config.json"
    if path.exists():
        try:
            extra = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            extra = None
        for token in [extra] if isinstance(extra, int) else (extra or []):
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _load_tokenizer(weights_dir):
    if not (weights_dir / "tokenizer.json").exists() and not (weights_dir / "tokenizer_config.json").exists():
        return None
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module="transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights_dir)


class LLMEngine:
    """Owns the model, KV cache and scheduler; ``add_request`` then ``step`` until done."""

    def __init__(
        self,
        config: EngineConfig,
        connector: KVConnectorSchedulerSide | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {config.device!r} asked for, but this torch ({torch.__version__}) sees no "
                             "CUDA device")
        set_threads(config.num_threads)
        self.model_config, model, self.tokenizer, self.model_name = load_model(config, progress)
        max_pos = self.model_config.max_position_embeddings
        if config.scheduler.max_model_len > max_pos:
            raise ModelLoadError(f"max_model_len: {config.scheduler.max_model_len} exceeds the model's {max_pos}")
        self.runner = ModelRunner(config, self.model_config, model)
        layout = self.runner.layout
        # NOTE: blocks outside an all-sliding model's window are released only without a KV connector: a prefill
        # worker's peer reads every block of the prompt.
        release = self.model_config.release_window if connector is None else None
        self.kv_manager = KVCacheManager(layout.num_blocks, layout.block_size, config.cache.enable_prefix_caching,
                                         sliding_window=release)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, connector, config.speculative)
        if progress:
            print(f"tandem: KV cache {layout.total_bytes / 2**20:.0f} MiB = {layout.num_blocks} blocks "
                  f"x {layout.block_size} tokens = {layout.num_blocks * layout.block_size} tokens "
                  f"({config.dtype})", file=sys.stderr)
        self.eos_token_id = self._eos_token_id()
        # Other end-of-turn ids (generation_config.json) stop a request like stop_token_ids, unless ignore_eos.
        eos_ids = self.model_config.eos_token_id
        self.extra_eos_token_ids = tuple(t for t in (eos_ids if isinstance(eos_ids, list) else [eos_ids])
                                         if t is not None and t != self.eos_token_id)
        # Grammars compile on their own thread; xgrammar is loaded on the first structured request.
        self.structured_output = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                         eos_token_id=self.eos_token_id)
        self._children: dict[str, _Child] = {}
        self._parents: dict[str, list[str]] = {}
        self._detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_num_tokens = 0
        self._ids = itertools.count()
        self._preseeded: list[_Child] = []  # requests whose handed-in first token is not yet reported
        self._warmed_at = float("-inf")  # time.monotonic() of the last keep_kv_cache_warm pass

    def keep_kv_cache_warm(self, now: float) -> bool:
        """Read one byte of every page of the blocks the next requests will get (the next ``max_model_len``
        tokens' worth at the head of the free queue), at most once every ``kv_keep_warm_interval_s``.

        Why: on VMs whose host reclaims guest memory left idle (the Firecracker VMs this was built on), the first
        touch of a page idle for ~30 s or more is slow, and the free queue hands out exactly those pages: the
        least recently used. A decode worker's READ of a 4,096-token prompt's KV (94 MB) into them ran at
        0.7-1.6 GB/s; with this pass every 5 s, at 4.9-9.9 (raw NIXL: 7-11). A pass reads ~26k bytes, a
        fraction of a millisecond. The async loop calls it after every step and every idle wake-up, busy or
        not, except while a remote READ is landing; returns whether it touched anything.
        """
        interval = self.config.cache.kv_keep_warm_interval_s
        if not interval or now - self._warmed_at < interval:
            return False
        self._warmed_at = now
        count = -(-self.config.scheduler.max_model_len // self.runner.block_size)
        self.runner.touch_blocks(self.kv_manager.pool.next_free_block_ids(count))
        return True

    def _eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        eos = self.model_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass token ids")
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template")
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )
        if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def add_request(
        self,
        request_id: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_transfer_params: KVTransferParams | dict | None = None,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a request (``params.n`` samples). Raises ValueError for an invalid one.

        ``kv_transfer_params`` come typed from the HTTP edge (a wire-format dict from Python callers is parsed)."""
        kv = KVTransferParams.parse(kv_transfer_params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._parents:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        max_len = self.config.scheduler.max_model_len
        if len(prompt_token_ids) >= max_len:
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens is too long for max_model_len={max_len} "
                "(at least one token must be left to generate)"
            )
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is not in the vocabulary [0, {vocab})")
        missing = [t for t in self.extra_eos_token_ids if t not in params.stop_token_ids]
        if missing and not params.ignore_eos:
            params = params.clone(stop_token_ids=[*params.stop_token_ids, *missing])
        first = self._handed_in_first_token(params, kv)
        grammars = self._grammars(params, first)
        if params.prior_output_tokens and params.structured_output is not None:
            # A resumed stream: its grammar state is rebuilt by advancing over the earlier output.
            for grammar in grammars:
                grammar.advance_when_ready(list(prompt_token_ids[-params.prior_output_tokens:]),  # type: ignore[union-attr]
                                           "tandem_continuation.prompt_token_ids")
            if grammars[0].error is not None:  # type: ignore[union-attr]
                raise ValueError(grammars[0].error)  # type: ignore[union-attr]
        children = []
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}-{i}"
            child_params = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + i
            )
            req = Request(
                request_id=cid,
                prompt_token_ids=list(prompt_token_ids),
                sampling_params=child_params,
                eos_token_id=self.eos_token_id,
                arrival_time=arrival_time or time.monotonic(),
                block_size=self.config.cache.block_size,
                group_id=None if params.n == 1 or i == 0 else f"{request_id}-0",
                kv_transfer_params=kv.to_dict() if kv is not None else None,  # the connector reads the wire form
                grammar=grammars[i],
            )
            children.append(req)
        for i, req in enumerate(children):
            self.scheduler.add_request(req)
            self._children[req.request_id] = child = _Child(request_id, i, req)
            if params.prior_output_tokens and self._detokenizer is not None:
                # A resumed stream: its earlier output is the text so far (a character split across the seam
                # decodes whole; stop strings are found across it). NOTE: none of it counts as emitted: the
                # server drops what its client already has (tandem_continuation.num_output_chars).
                self._detokenizer.skip_special_tokens = params.skip_special_tokens
                self._detokenizer.add(child.detok, list(prompt_token_ids[-params.prior_output_tokens:]))
        self._parents[request_id] = [r.request_id for r in children]
        if first is not None:  # (appended after add_request: a prompt of max_model_len - 1 is still valid)
            token, logprobs = first
            req = children[0]
            req.append_output_token(token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs)
            req.num_preseeded_tokens = 1
            self._preseeded.append(self._children[req.request_id])
            status = self.scheduler.check_stop(req, token)
            if status is not None:  # e.g. EOS, max_tokens 1, or the context is full: done without a step
                self.scheduler.finish_requests([req.request_id], status)
        return request_id

    def _grammars(self, params: SamplingParams,
                  first: tuple[int, dict[int, float] | None] | None) -> list[RequestGrammar | None]:
        """One grammar state per sample (None without structured output). Raises ValueError naming the field
        for a schema, regex or grammar that does not parse. A handed-in first token is advanced over as soon
        as the grammar is compiled; a token the grammar forbids is a ValueError naming
        ``kv_transfer_params.first_token_id`` (or, when the compile finishes only later, ends the request with
        that error)."""
        spec = params.structured_output
        if spec is None:
            return [None] * params.n
        grammars: list[RequestGrammar | None] = [self.structured_output.grammar_for(spec) for _ in range(params.n)]
        # NOTE: most grammars compile in about a millisecond: a short wait saves them a trip through
        # WAITING_FOR_GRAMMAR; slow ones keep compiling off the step loop.
        grammars[0].wait(0.005)  # type: ignore[union-attr]
        if first is not None:
            grammars[0].advance_when_ready([first[0]], "kv_transfer_params.first_token_id")  # type: ignore[union-attr]
            if grammars[0].error is not None:  # type: ignore[union-attr]
                raise ValueError(grammars[0].error)  # type: ignore[union-attr]
        return grammars

    def _handed_in_first_token(self, params: SamplingParams,
                               kv: KVTransferParams | None) -> tuple[int, dict[int, float] | None] | None:
        """The prefill worker's first token that came with a disaggregated request, when it can be used:
        the decode side streams it at once and generates from the second token on (only with a KV connector,
        one sample and no prompt logprobs; without logprobs for it, when they are asked, it is sampled again).
        Raises ValueError for a malformed one."""
        if (kv is None or not kv.do_remote_prefill or kv.first_token_id is None or self.scheduler.connector is None
                or params.n != 1 or params.prompt_logprobs is not None):
            return None
        token = kv.first_token_id
        vocab = self.model_config.vocab_size
        if not 0 <= token < vocab:
            raise ValueError(f"kv_transfer_params.first_token_id: must be an integer in [0, {vocab})")
        if params.logprobs is None:
            return token, None
        logprobs = kv.first_token_logprobs
        if logprobs is None:
            return None
        if token not in logprobs:
            raise ValueError("kv_transfer_params.first_token_logprobs: must include first_token_id")
        return token, logprobs

    def take_preseeded_deltas(self) -> list[RequestDelta]:
        """Deltas for first tokens that came with requests: available before any step runs."""
        deltas = []
        for child in self._preseeded:
            req = child.request
            if req.request_id not in self._children:
                continue  # aborted before it was reported
            if req.grammar is not None and req.grammar.ready and req.grammar.error:
                continue  # a first token its grammar forbids: the request ends with that error instead
            self.prompt_tokens_total += req.num_prompt_tokens
            self.generation_tokens_total += 1
            deltas.append(self._process(child, req.output_token_ids[:1], req.is_finished, None))
        self._preseeded.clear()
        return deltas

    def abort_request(self, request_ids: list[str] | str) -> None:
        """Cancel requests: their blocks go back to the pool at once."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            for cid in self._parents.pop(rid, []):
                self.scheduler.finish_requests([cid], RequestStatus.FINISHED_ABORTED)
                self._children.pop(cid, None)
                self.runner.sampler.forget(cid)

    def is_active(self, request_id: str) -> bool:
        """Whether a request (any of its samples) is still queued or running."""
        return request_id in self._parents

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents) or self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        sched = self.scheduler.schedule()
        self.last_step_num_tokens = sched.total_tokens
        deltas = self.take_preseeded_deltas() + self._failed_deltas()
        if not sched.scheduled:
            return deltas
        output = self.runner.execute(sched)
        updates = self.scheduler.update_from_output(sched, output)
        for upd in updates:
            child = self._children.get(upd.request.request_id)
            if child is None:
                continue
            if upd.request.num_output_tokens == 1:  # (a handed-in first token was counted when reported)
                self.prompt_tokens_total += upd.request.num_prompt_tokens
            self.generation_tokens_total += len(upd.new_token_ids)
            deltas.append(self._process(child, upd.new_token_ids, upd.finished, upd.kv_transfer_params))
        return deltas

    def _failed_deltas(self) -> list[RequestDelta]:
        """Final deltas (finish_reason "error", ``error`` set) of requests the scheduler ended with an error."""
        deltas = []
        for request, error in self.scheduler.take_failed():
            child = self._children.get(request.request_id)
            if child is None:
                continue
            delta = self._process(child, [], True, None)
            delta.error = error
            deltas.append(delta)
        return deltas

    def _process(self, child: _Child, new_ids: list[int], finished: bool, kv_params: dict | None) -> RequestDelta:
        req = child.request
        sp = req.sampling_params
        new_text = ""
        stop_reason: str | int | None = None
        status = req.status
        if finished and status == RequestStatus.FINISHED_STOPPED and new_ids:
            stop_reason = new_ids[-1] if new_ids[-1] != req.eos_token_id else None
        logprobs = req.output_logprobs[-len(new_ids):] if sp.logprobs is not None and new_ids else []
        if self._detokenizer is not None:
            text_ids = new_ids
            if finished and status == RequestStatus.FINISHED_STOPPED and not sp.include_stop_str_in_output:
                text_ids = new_ids[:-1]  # the EOS / stop token itself (always the last) is not part of the text
            self._detokenizer.skip_special_tokens = sp.skip_special_tokens
            if sp.stop:
                # NOTE: token by token, so a stop string completed inside a multi-token (speculative) step
                # ends the output at the token that completed it, as plain decoding would (even when the
                # step also reached EOS: finish_requests is then a no-op).
                text = child.detok.text
                for count, token in enumerate(text_ids, 1):
                    self._detokenizer.add(child.detok, [token])
                    text = child.detok.text
                    hit = find_stop(text, len(text) - child.detok.emitted + 1, sp.stop)
                    if hit is not None:
                        idx, stop = hit
                        cut = idx + len(stop) if sp.include_stop_str_in_output else idx
                        child.detok.text = text = text[:cut]
                        finished, stop_reason = True, stop
                        self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                        status = RequestStatus.FINISHED_STOPPED
                        new_ids, logprobs = new_ids[:count], logprobs[:count]
                        break
            else:
                self._detokenizer.add(child.detok, text_ids)
                text = child.detok.text
            # While running, hold back a tail that could still become a stop string.
            hold = 0 if finished or not sp.stop else max(len(s) for s in sp.stop) - 1
            upto = max(child.detok.emitted, len(text) - hold)
            new_text = text[child.detok.emitted : upto]
            child.detok.emitted = upto
        delta = RequestDelta(
            request_id=child.parent_id,
            index=child.index,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=status.finish_reason if finished else None,
            stop_reason=stop_reason,
            new_logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            kv_transfer_params=kv_params,
        )
        if not child.sent_queue_time and req.first_scheduled_time is not None:
            delta.queue_time = max(0.0, req.first_scheduled_time - req.arrival_time)
            child.sent_queue_time = True
        self._time_phases(child, delta)
        if sp.prompt_logprobs is not None and not child.sent_prompt_logprobs:
            delta.prompt_logprobs = req.prompt_logprobs
            child.sent_prompt_logprobs = True
        if finished:
            self._children.pop(req.request_id, None)
            self.runner.sampler.forget(req.request_id)
            siblings = self._parents.get(child.parent_id)
            if siblings is not None and all(c not in self._children for c in siblings):
                del self._parents[child.parent_id]
        return delta

    @staticmethod
    def _time_phases(child: _Child, delta: RequestDelta) -> None:
        """Put vLLM's phase times of ``child`` on ``delta``: prefill on its first token, decode and inference
        on its last."""
        req = child.request
        now = time.monotonic()
        scheduled = req.first_scheduled_time
        if delta.new_token_ids and child.first_token_at is None:
            child.first_token_at = now
            # A first token handed in by a remote prefill was computed elsewhere: this engine has no prefill time.
            if scheduled is not None and not req.num_preseeded_tokens:
                delta.prefill_time = now - scheduled
        if delta.finished and scheduled is not None:
            delta.inference_time = now - scheduled
            if child.first_token_at is not None:
                delta.decode_time = now - max(child.first_token_at, scheduled)

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        pool = self.kv_manager.pool
        ps = self.kv_manager.prefix_stats
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=pool.usage,
            num_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            prefix_cache_queries=ps.queries,
            prefix_cache_hits=ps.hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            spec_num_drafts=self.scheduler.num_spec_drafts,
            spec_num_draft_tokens=self.scheduler.num_spec_draft_tokens,
            spec_num_accepted_tokens=self.scheduler.num_spec_accepted_tokens,
        )

    def take_kv_events(self):
        return self.kv_manager.take_events()
