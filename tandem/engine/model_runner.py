"""The model runner: ``prepare_inputs -> forward -> sample`` over the paged KV cache.

It owns the model, the KV cache buffer (one tensor, see ``core/kv_layout.py``) and the sampler. It
is stateless across steps except for the KV contents: everything it needs comes from the
``SchedulerOutput`` it is given.
"""

from __future__ import annotations

import logging
import os

from dataclasses import dataclass

import torch

from tandem.engine.config import EngineConfig, activation_bytes_estimate, measure_gpu_kv_cache_size
from tandem.engine.core.kv_layout import KVCacheLayout
from tandem.engine.core.scheduler import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tandem.engine.host_memory import allocate_pool, huge_page_bytes
from tandem.engine.attention import (
    AttentionMetadata,
    PagedKVIndexer,
    PagedReads,
    VerifyGroup,
    fresh_prefill_batch,
    select_backend,
)
from tandem.engine.models.common import DecoderLM, can_pack_linears
from tandem.engine.models.config import ModelConfig
from tandem.engine.sampler import Sampler, prompt_logprobs_for

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~46k tokens of SmolLM2-135M in bf16
PAGE_BYTES = 4096  # the smallest page a host may reclaim (touch_blocks)
KV_POOL_FILL = 1.0  # what never-written KV cache slots hold (see ModelRunner.__init__)


@dataclass(slots=True)
class PreparedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: list[int]  # flat token index whose logits are sampled, per sampling request
    sample_items: list[ScheduledRequest]
    order: list[ScheduledRequest]  # items in flat order (decodes first)
    spec_rows: list[tuple[ScheduledRequest, int]]  # speculative items and the flat index of their first token


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: DecoderLM) -> None:
        self.config = config
        self.model_config = model_config
        self.dtype = DTYPES[config.dtype]
        self.device = torch.device(config.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.init_rope(self.device)  # plain fp32 tensors, not buffers: .to() above does not move them
        self.model.attention_backend = select_backend(self.device, config.attention_backend)
        ops = None
        if self.model.attention_backend.name == "cpu-paged":
            # NOTE: the native CPU path: its attention operators, the fused norm/RoPE/activation kernels and the
            # bf16 linear. The torch backend stays all-torch (oneDNN's linears), the reference the kernels are
            # tested against.
            from tandem.engine.ops import fused

            ops = fused.load()
            self.model.use_fused_ops(ops)
        if can_pack_linears(self.dtype, self.device):
            self.model.pack_linears(ops)
            if ops is not None:
                logger.info("CPU linears: %s", "AMX tiles for products of 4 or more rows, AVX-512 below"
                            if ops.module.linear_amx() else "AVX-512 (no AMX on this CPU)")
                why_not = self.model.build_native_decoder(ops)
                logger.info("decode steps: %s", "every layer in one native call" if why_not is None
                            else f"layer by layer ({why_not})")
        self.block_size = config.cache.block_size
        self.layout = self._size_kv_cache()
        # NOTE: one contiguous block-major buffer (kvtransfer registers it once and moves a run of blocks as one
        # region); attention addresses it by row and token indices built once per step (see attention/paged.py).
        # NOTE: filled with a non-zero constant, not zeros. On the VMs this runs on, idle all-zero pages are slow
        # to write again (1.2-2.7 GB/s after 45 s idle, vs 5.5-9.8 GB/s for idle non-zero pages, measured here):
        # the host appears to reclaim them. Unused blocks are never attended to (masked, or sliced off), and any
        # finite value is harmless there: a masked score is -inf, so its value row is multiplied by an exact 0.
        # NOTE: on CPU the pool lies in its own mapping on transparent huge pages (see host_memory): kvtransfer's
        # READs pin and copy it page by page, and 2 MiB pages made them ~1.5x faster here.
        if self.device.type == "cpu":
            pool = allocate_pool(self.layout.shape, self.dtype, KV_POOL_FILL)
            self.kv_buffer = pool.tensor
            backed = huge_page_bytes(self.kv_buffer) if pool.huge_pages_requested else 0
            logger.info("KV cache pool: %.0f MiB, %s MiB of it on huge pages", self.layout.total_bytes / 2**20,
                        "?" if backed is None else f"{backed / 2**20:.0f}")
        else:
            self.kv_buffer = torch.full(self.layout.shape, KV_POOL_FILL, dtype=self.dtype, device=self.device)
        self.indexer = PagedKVIndexer(self.layout)
        self.sampler = Sampler(model_config.vocab_size, seed=config.seed,
                               argmax_rows=None if ops is None else ops.argmax_rows)
        self._page_offsets = torch.arange(0, self.layout.bytes_per_block_all_layers, PAGE_BYTES)  # of every page in a block

    def page_offsets(self, block_ids: list[int]) -> torch.Tensor:
        """Byte offset, in ``kv_buffer``, of the start of every ``PAGE_BYTES`` page of these blocks."""
        starts = torch.tensor(block_ids, dtype=torch.long) * self.layout.bytes_per_block_all_layers
        return (starts[:, None] + self._page_offsets[None, :]).view(-1)

    def touch_blocks(self, block_ids: list[int]) -> None:
        """Read one byte of every memory page of these blocks (see ``LLMEngine.keep_kv_cache_warm``)."""
        if block_ids and self.device.type == "cpu":
            self.kv_buffer.view(-1).view(torch.uint8).index_select(0, self.page_offsets(block_ids)).max()

    def _default_kv_cache_memory(self) -> int:
        """KV bytes when none were given: on CUDA, what ``gpu_memory_utilization`` leaves after the weights (loaded
        by now) and an estimate of the activations; on CPU, ``DEFAULT_KV_CACHE_MEMORY``."""
        if self.device.type != "cuda":
            return DEFAULT_KV_CACHE_MEMORY
        mc, sched = self.model_config, self.config.scheduler
        activations = activation_bytes_estimate(
            sched.max_num_batched_tokens, sched.max_num_seqs, mc.hidden_size, mc.intermediate_size, mc.num_heads,
            mc.num_kv_heads, mc.head_dim, mc.vocab_size, torch.empty((), dtype=self.dtype).element_size())
        size = measure_gpu_kv_cache_size(self.device, self.config.cache.gpu_memory_utilization, activations)
        logger.info("%s", size.explanation)
        return size.num_bytes

    def _size_kv_cache(self) -> KVCacheLayout:
        cfg, mc = self.config.cache, self.model_config
        probe = KVCacheLayout(mc.num_layers, 1, cfg.block_size, mc.num_kv_heads, mc.head_dim, self.config.dtype)
        if cfg.num_blocks is not None:
            num_blocks = cfg.num_blocks
        else:
            memory = cfg.kv_cache_memory or self._default_kv_cache_memory()
            num_blocks = memory // probe.bytes_per_block_all_layers
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory: {memory} bytes is less than one block ({probe.bytes_per_block_all_layers} bytes)"
                )
        needed = -(-self.config.scheduler.max_model_len // cfg.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"kv_cache_memory: {num_blocks} blocks cannot hold one max_model_len="
                f"{self.config.scheduler.max_model_len} sequence ({needed} blocks needed)"
            )
        return KVCacheLayout(mc.num_layers, num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim, self.config.dtype)

    # ---- prepare_inputs -> forward -> sample ---------------------------------------------------
    def prepare_inputs(self, sched: SchedulerOutput) -> PreparedBatch:
        bs = self.block_size
        decodes = [s for s in sched.scheduled if s.num_tokens == 1]
        prefills = [s for s in sched.scheduled if s.num_tokens > 1]
        order = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_items: list[ScheduledRequest] = []
        prefill_items: list[tuple[ScheduledRequest, int]] = []
        spec_rows: list[tuple[ScheduledRequest, int]] = []
        verify_items: list[tuple[ScheduledRequest, int]] = []
        for item in order:
            req, start, n = item.request, item.request.num_computed_tokens, item.num_tokens
            q_start = len(input_ids)
            input_ids.extend(req.all_token_ids[start : start + n])
            if item.spec_token_ids:  # [last token, drafts...]: every position is sampled (verified)
                input_ids.extend(item.spec_token_ids)
                spec_rows.append((item, q_start))
            ids = item.block_ids
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(ids[pos // bs] * bs + pos % bs)
            if not item.spec_token_ids and start + n == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_items.append(item)
            if item.spec_token_ids:
                verify_items.append((item, q_start))
            elif n > 1:
                prefill_items.append((item, q_start))
        meta = AttentionMetadata(
            write_index=self.indexer.token_slots(torch.tensor(slots, dtype=torch.long)),
            num_decode=len(decodes),
            reads={w: self._reads(w, decodes, verify_items, prefill_items) for w in self.model_config.windows},
        )
        input_ids_t = torch.tensor(input_ids, dtype=torch.long)
        positions_t = torch.tensor(positions, dtype=torch.long)
        if self.device.type != "cpu":
            for reads in meta.reads.values():
                reads.fresh_batch = fresh_prefill_batch(reads.prefills, reads.window)
            meta.map_tensors(self._to_device)
            input_ids_t, positions_t = self._to_device(input_ids_t), self._to_device(positions_t)
        return PreparedBatch(
            input_ids=input_ids_t,
            positions=positions_t,
            meta=meta,
            sample_rows=sample_rows,
            sample_items=sample_items,
            order=order,
            spec_rows=spec_rows,
        )

    def _reads(self, window: int | None, decodes: list[ScheduledRequest],
               verify_items: list[tuple[ScheduledRequest, int]],
               prefill_items: list[tuple[ScheduledRequest, int]]) -> PagedReads:
        """What layers with ``window`` read this step: block tables start at the window's first block."""
        reads = PagedReads(window=window, verify=self._verify_groups(verify_items, window))
        if decodes:
            reads.decode_gather_rows, reads.decode_mask = self._paged_batch(decodes, 1, window)
        for item, q_start in prefill_items:
            ctx = item.request.num_computed_tokens + item.num_tokens
            reads.prefills.append(self.indexer.prefill_seq(q_start, item.block_ids, ctx, item.num_tokens, window))
        return reads

    def _verify_groups(self, items: list[tuple[ScheduledRequest, int]], window: int | None) -> list[VerifyGroup]:
        """Speculative chunks (at flat offset ``q_start``), grouped by length for batched attention."""
        by_len: dict[int, list[tuple[ScheduledRequest, int]]] = {}
        for item, q_start in items:
            by_len.setdefault(item.num_tokens, []).append((item, q_start))
        groups = []
        for q_len, members in by_len.items():
            rows, mask = self._paged_batch([item for item, _ in members], q_len, window)
            token_index = torch.tensor([q0 + i for _, q0 in members for i in range(q_len)], dtype=torch.long)
            groups.append(VerifyGroup(token_index, rows, mask, len(members), q_len))
        return groups

    def _paged_batch(self, items: list[ScheduledRequest], q_len: int,
                     window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and mask for ``items`` each computing its next ``q_len`` tokens (see ``PagedKVIndexer.paged_batch``)."""
        seqs = [(it.block_ids, it.request.num_computed_tokens + q_len) for it in items]
        return self.indexer.paged_batch(seqs, q_len, window)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A step's index tensor, built on the host, on the model's device (pinned, so the copy is asynchronous)."""
        return t.pin_memory().to(self.device, non_blocking=True)

    def _host(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits for speculative verification and prompt logprobs, which run on the host (row by row)."""
        return logits if self.device.type == "cpu" else logits.cpu()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if not sched.scheduled:
            return out
        batch = self.prepare_inputs(sched)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_buffer, batch.meta)
        self._prompt_logprobs(batch, hidden, out)
        if batch.sample_rows:
            logits = self.model.compute_logits(hidden[batch.sample_rows])  # the sampler moves it if it must
            requests = [item.request for item in batch.sample_items]
            result = self.sampler.sample(logits, requests)
            for req, tok, lp in zip(requests, result.token_ids, result.logprobs):
                out.sampled[req.request_id] = tok
                if lp is not None:
                    out.logprobs[req.request_id] = lp
        for item, first in batch.spec_rows:
            n = item.num_tokens
            result = self.sampler.verify(self._host(self.model.compute_logits(hidden[first : first + n])), item.request,
                                         item.spec_token_ids)
            out.spec_sampled[item.request.request_id] = result.token_ids
            out.spec_logprobs[item.request.request_id] = result.logprobs
        return out

    def _prompt_logprobs(self, batch: PreparedBatch, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        offset = 0
        for item in batch.order:
            req, start, n = item.request, item.request.num_computed_tokens, item.num_tokens
            k = req.sampling_params.prompt_logprobs
            if k is not None and start < req.num_prompt_tokens:
                # Position p's logits predict token p + 1; the first prompt token has no logprob.
                end = min(start + n, req.num_prompt_tokens - 1)
                entries: list[dict[int, float] | None] = [None] if start == 0 else []
                if end > start:
                    logits = self._host(self.model.compute_logits(hidden[offset : offset + (end - start)]))
                    entries.extend(prompt_logprobs_for(logits, req.prompt_token_ids[start + 1 : end + 1], k))
                out.prompt_logprobs[req.request_id] = entries
            offset += n


def set_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` torch threads (default: TANDEM_NUM_THREADS or every core)."""
    n = num_threads or int(os.environ.get("TANDEM_NUM_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


