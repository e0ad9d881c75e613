"""Turning logits into tokens: grammar masks, logit bias, penalties, temperature, top-k/top-p/min-p, seeds
and logprobs.

The order is vLLM's: the structured output grammar's mask, then the logprobs (so they are those of the masked
distribution, before logit bias, penalties and temperature), then logit bias and min_tokens, then
penalties, then temperature, top-k, min-p and top-p.

NOTE: each seeded request owns a ``torch.Generator`` and draws exactly one exponential vector per
sampled token, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.engine.core.request import Request
from tandem.engine.structured_output import apply_draft_bitmask, apply_grammar_bitmask


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Per row: {token_id: logprob} holding the top-k tokens and the chosen one (None if not asked).
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0,
                 argmax_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.vocab_size = vocab_size
        # A batch's greedy picks on the CPU: the fused kernel's one pass (FusedOps.argmax_rows) where it is loaded.
        self._argmax_rows = argmax_rows
        self._global = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self._global
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            # Tokens sampled elsewhere (a prefill worker's first token, or the earlier output of a resumed
            # stream) used the first draws of this seed.
            for _ in range(request.num_preseeded_tokens + request.sampling_params.prior_output_tokens):
                torch.empty(self.vocab_size).exponential_(generator=gen)
            self._generators[request.request_id] = gen
        return gen

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits: [B, V] (any float dtype, any device), one row per request.

        A batch that only takes argmaxes is sampled where its logits are (off a GPU come B token ids, not B x V
        logits); any random draw, grammar mask or logit bias moves the batch to the host, where the per-request
        generators and the grammar matchers live.
        """
        if (self._argmax_rows is not None and logits.device.type == "cpu"
                and logits.dtype in (torch.float32, torch.bfloat16) and all(map(_raw_argmax, requests))):
            # Nothing but each row's argmax is asked: picked on the LM head's own rows (bf16 read as is, the padded
            # vocabulary's columns skipped in place), without the fp32 copy below (6 MB at 32 rows of SmolLM2).
            return SampleResult(self._argmax_rows(logits[:, : self.vocab_size]).tolist(), [None] * len(requests))
        if logits.device.type != "cpu" and not all(_argmax_only(r) for r in requests):
            logits = logits.cpu()
        logits = logits[:, : self.vocab_size].float().contiguous()  # (xgrammar's CPU mask wants contiguous rows)
        apply_grammar_bitmask(logits, requests)  # [B, V]: the whole batch in one call, free rows untouched
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        for row, request in enumerate(requests):
            sp = request.sampling_params
            if sp.logit_bias:
                self._apply_logit_bias(logits[row], sp.logit_bias)
            if request.num_output_tokens < sp.min_tokens:
                self._ban_stops(logits[row], request)
            if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
                self._apply_penalties(logits[row], request)

        greedy = all(r.sampling_params.greedy for r in requests)
        if greedy:
            native = self._argmax_rows is not None and logits.device.type == "cpu"
            chosen = (self._argmax_rows(logits) if native else logits.argmax(dim=-1)).tolist()
        else:
            chosen = [0] * len(requests)
            for row, request in enumerate(requests):
                sp = request.sampling_params
                if sp.greedy:
                    chosen[row] = int(logits[row].argmax())
                    continue
                probs = self._probs(logits[row], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
                # Exponential race == sampling from probs, with one draw per token from the request's own RNG.
                q = torch.empty_like(probs).exponential_(generator=self._generator(request))
                chosen[row] = int((probs / q).argmax())

        out_logprobs: list[dict[int, float] | None] = []
        for row, request in enumerate(requests):
            if not want_logprobs[row]:
                out_logprobs.append(None)
                continue
            assert raw_logprobs is not None
            k = request.sampling_params.logprobs or 0
            entry: dict[int, float] = {}
            entry[chosen[row]] = float(raw_logprobs[row, chosen[row]])
            if k:
                vals, idx = raw_logprobs[row].topk(k)
                for t, v in zip(idx.tolist(), vals.tolist()):
                    if v != float("-inf"):  # a token the grammar masks out is not a candidate
                        entry.setdefault(t, v)
            out_logprobs.append(entry)
        return SampleResult(chosen, out_logprobs)

    @torch.no_grad()
    def verify(self, logits: torch.Tensor, request: Request, drafts: list[int]) -> SampleResult:
        """Accept or reject speculative ``drafts`` (see ``spec_decode.py``); returns the tokens to append.

        logits: [len(drafts) + 1, V], row i predicting the token after draft i (row 0: after the last real
        token). The request has no penalties and no pending min_tokens (the scheduler only speculates then).
        """
        logits = logits[:, : self.vocab_size].float().contiguous()
        apply_draft_bitmask(logits, request, drafts)  # row i: what the grammar allows after drafts[:i]
        masked = logits  # logprobs are those of the masked distribution, as in sample()
        sp = request.sampling_params
        if sp.logit_bias:
            logits = logits.clone()
            for row in range(logits.shape[0]):
                self._apply_logit_bias(logits[row], sp.logit_bias)
        tokens: list[int] = []
        for row, draft in enumerate([*drafts, None]):
            if sp.greedy:
                target = int(logits[row].argmax())
                tokens.append(target)
                if target != draft:
                    break
                continue
            probs = self._probs(logits[row], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
            generator = self._generator(request)
            if draft is not None and float(torch.rand((), generator=generator)) < float(probs[draft]):
                tokens.append(draft)
                continue
            if draft is not None:
                probs = probs.clone()
                probs[draft] = 0.0  # the residual max(0, p - q) of a one-hot proposal q
            q = torch.empty_like(probs).exponential_(generator=generator)
            tokens.append(int((probs / q).argmax()))
            break
        if sp.logprobs is None:
            return SampleResult(tokens, [None] * len(tokens))
        # Row i's distribution chose token i: the same entries as a prompt's logprobs (chosen + top-k).
        return SampleResult(tokens, list(prompt_logprobs_for(masked[: len(tokens)], tokens, sp.logprobs)))

    @staticmethod
    def _probs(row: torch.Tensor, temperature: float, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
        row = row / temperature
        if top_k is not None and top_k < row.numel():
            kth = row.topk(top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if min_p > 0:
            probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(0)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = (cum - sorted_probs) >= top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return probs / probs.sum()

    @staticmethod
    def _apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
        """Add OpenAI-style biases to one row of logits (a masked -inf stays -inf)."""
        ids = torch.tensor(list(bias), dtype=torch.long, device=row.device)
        row.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device))

    @staticmethod
    def _ban_stops(row: torch.Tensor, request: Request) -> None:
        """min_tokens not reached: EOS and the stop token ids may not be sampled. NOTE: a grammar that allows
        nothing else (it is complete) wins over min_tokens, so a row is never left without a token."""
        sp = request.sampling_params
        banned = list(sp.stop_token_ids)
        if request.eos_token_id is not None and not sp.ignore_eos:
            banned.append(request.eos_token_id)
        if not banned:
            return
        saved = row[banned].clone()
        row[banned] = float("-inf")
        if request.grammar is not None and not torch.isfinite(row).any():
            row[banned] = saved

    @staticmethod
    def _apply_penalties(row: torch.Tensor, request: Request) -> None:
        sp = request.sampling_params
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        # A resumed stream's earlier output ends its prompt: it counts as output (vLLM's penalties' semantics).
        output = (request.all_token_ids[request.num_prompt_tokens - sp.prior_output_tokens:]
                  if sp.prior_output_tokens else request.output_token_ids)
        if (sp.presence_penalty or sp.frequency_penalty) and output:
            ids, counts = torch.tensor(output, dtype=torch.long, device=row.device).unique(return_counts=True)
            row[ids] -= sp.frequency_penalty * counts.float() + sp.presence_penalty


def _argmax_only(request: Request) -> bool:
    """Whether the request's token is the argmax of its raw logits (no draw, mask or bias on the host)."""
    sp = request.sampling_params
    return sp.greedy and request.grammar is None and not sp.logit_bias


def _raw_argmax(request: Request) -> bool:
    """Whether the request's token is the argmax of its raw logits and nothing else is asked of them: no draw,
    grammar mask, logit bias, penalty, min_tokens ban or logprobs."""
    sp = request.sampling_params
    return (_argmax_only(request) and sp.logprobs is None and request.num_output_tokens >= sp.min_tokens
            and sp.repetition_penalty == 1.0 and not sp.presence_penalty and not sp.frequency_penalty)


def prompt_logprobs_for(logits: torch.Tensor, next_tokens: list[int], k: int) -> list[dict[int, float]]:
    """Logprobs of each actual next prompt token (plus the top-k) for logits rows [n, V]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, tok in enumerate(next_tokens):
        entry = {tok: float(lp[row, tok])}
        if k:
            vals, idx = lp[row].topk(k)
            for t, v in zip(idx.tolist(), vals.tolist()):
                if v != float("-inf"):  # masked out by a grammar (speculative verify rows)
                    entry.setdefault(t, v)
        out.append(entry)
    return out
