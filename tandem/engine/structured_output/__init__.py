"""Grammar-constrained decoding with xgrammar: specs compiled once per tokenizer, one matcher per sequence.

``StructuredOutputManager`` turns a ``StructuredOutputSpec`` into an xgrammar grammar: parsing (which finds
a bad schema, regex or grammar) runs at ``add_request`` so the error reaches the client as a 400; compiling
(the tokenizer-dependent part, slow for big schemas) runs in a thread pool, and the request waits in the
scheduler (``WAITING_FOR_GRAMMAR``) until it is done, as vLLM's ``WAITING_FOR_FSM`` does. Compiled grammars
are cached (LRU, keyed by spec). Each sequence (each of ``n`` samples) gets its own ``RequestGrammar``.

``apply_grammar_bitmask`` masks a whole batch's logits at once; ``draft_bitmask`` masks a speculative
verify chunk row by row. NOTE: xgrammar is imported on first use (it takes seconds), so engines that never
see a structured request never load it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from tandem.protocol.structured_output import StructuredOutputSpec

if TYPE_CHECKING:  # pragma: no cover
    from tandem.engine.core.request import Request

# xgrammar prefixes its C++ errors with "[hh:mm:ss] /path/file.cc:123: "; the client needs only the reason.
_XGR_ERROR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _clean_error(exc: BaseException) -> str:
    """The first line of an xgrammar error without its time and source location."""
    lines = _XGR_ERROR_PREFIX.sub("", str(exc).strip()).splitlines()
    return lines[0] if lines and lines[0].strip() else type(exc).__name__


class RequestGrammar:
    """One sequence's grammar state: the (shared) compile future and, once compiled, its own matcher.

    Used by the scheduler (``ready``, ``error``, ``accept``, ``is_terminated``, ``valid_prefix``) and the
    sampler (``fill_bitmask``, ``draft_bitmask``); it never changes the request itself.
    """

    __slots__ = ("spec", "_future", "_matcher", "_error", "_new_matcher", "_pending", "_pending_field")

    def __init__(self, spec: StructuredOutputSpec, future: Future, new_matcher) -> None:
        self.spec = spec
        self._future = future
        self._matcher = None
        self._error: str | None = None
        self._new_matcher = new_matcher
        # Tokens generated elsewhere (a remote prefill's first token) to advance over once compiled.
        self._pending: list[int] = []
        self._pending_field = ""

    @property
    def ready(self) -> bool:
        """Whether compiling is over (successfully or not: see ``error``); builds the matcher when it is."""
        if self._matcher is not None or self._error is not None:
            return True
        if not self._future.done():
            return False
        exc = self._future.exception()
        if exc is not None:
            self._error = f"{self.spec.field}: {_clean_error(exc)}"
        else:
            self._matcher = self._new_matcher(self._future.result())
            self._advance_pending()
        return True

    def advance_when_ready(self, tokens: list[int], field: str) -> None:
        """Advance over ``tokens`` generated elsewhere (now, or as soon as the grammar is compiled); if the
        grammar forbids one, ``error`` says so naming ``field``."""
        self._pending.extend(tokens)
        self._pending_field = field
        if self._matcher is not None:
            self._advance_pending()

    def _advance_pending(self) -> None:
        for token in self._pending:
            if not self._matcher.accept_token(token):
                self._error = f"{self._pending_field}: token {token} is not allowed by the {self.spec.field} grammar"
                break
        self._pending.clear()

    def wait(self, timeout: float | None) -> bool:
        """Block until compiled (or ``timeout`` seconds pass); returns ``ready``."""
        try:
            self._future.exception(timeout=timeout)
        except TimeoutError:
            return False
        return self.ready

    @property
    def error(self) -> str | None:
        """Why the grammar could not be compiled (the spec's field named), or None."""
        return self._error

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted its stop token: nothing more may be generated."""
        return self._matcher is not None and self._matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance over a generated token; False if the grammar does not allow it (the state is unchanged)."""
        assert self._matcher is not None, "accept before the grammar is ready"
        return bool(self._matcher.accept_token(token_id))

    def valid_prefix(self, tokens: list[int]) -> list[int]:
        """The longest prefix of ``tokens`` (speculative drafts) the grammar allows from here; no net change."""
        if self._matcher is None:
            return []
        count = 0
        for token in tokens:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                break
            count += 1
        if count:
            self._matcher.rollback(count)
        return tokens[:count]

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` ([B, ceil(V / 32)] int32)."""
        assert self._matcher is not None, "sampling before the grammar is ready"
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def draft_bitmask(self, drafts: list[int], vocab_size: int) -> torch.Tensor:
        """Masks for a verify chunk: row ``i`` ([len(drafts) + 1, ceil(V / 32)]) holds the tokens allowed after
        ``drafts[:i]`` (rows past a rejected draft or the stop token stay all-allowed: they are never used).
        Drafts are accepted only to compute the rows and rolled back after."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(drafts) + 1, vocab_size)
        accepted = 0
        for row in range(len(drafts) + 1):
            self.fill_bitmask(bitmask, row)
            if row == len(drafts) or not self._matcher.accept_token(drafts[row]):
                break  # later rows cannot be reached: their drafts are rejected by this row's mask
            accepted += 1
            if self._matcher.is_terminated():
                break  # a draft was the stop token: the request ends there, later rows are never used
        if accepted:
            self._matcher.rollback(accepted)
        return bitmask


class StructuredOutputManager:
    """Compiles structured output specs for one tokenizer and hands out per-sequence ``RequestGrammar``s.

    ``tokenizer`` is the model's Hugging Face tokenizer; ``vocab_size`` the model's (padded) vocabulary, the
    width of its logits. Compiles run on ``max_workers`` threads; ``cache_size`` compiled grammars are kept.
    """

    def __init__(self, tokenizer, vocab_size: int, *, eos_token_id: int | None = None, max_workers: int = 1,
                 cache_size: int = 128) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        self._max_workers = max_workers
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()
        self._compiler = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # the compiler is built once, from whichever thread asks first

    def grammar_for(self, spec: StructuredOutputSpec) -> RequestGrammar:
        """A fresh grammar state for one sequence. Raises ValueError naming ``spec.field`` when the schema,
        regex or grammar is invalid (found by parsing, here, before anything is queued)."""
        future = self._cache.get(spec)
        if future is None or (future.done() and future.exception() is not None):
            grammar = self._parse(spec)
            future = self._executor().submit(self._compiler_instance().compile_grammar, grammar)
            self._cache[spec] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec)
        return RequestGrammar(spec, future, self._new_matcher)

    def shutdown(self) -> None:
        """Stop the compile threads (pending compiles are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ---- internals -----------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="grammar-compile")
        return self._pool

    def _compiler_instance(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                if self._tokenizer is None:
                    raise ValueError("structured_output: this model has no tokenizer to build a grammar from")
                stop = None if self._eos_token_id is None else [self._eos_token_id]
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=stop)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_workers)
            return self._compiler

    @staticmethod
    def _new_matcher(compiled) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def _parse(self, spec: StructuredOutputSpec):
        """The xgrammar ``Grammar`` for ``spec``; ValueError naming ``spec.field`` if it does not parse."""
        import xgrammar as xgr

        self._compiler_instance()  # a model without a tokenizer fails here, before any parse
        try:
            if spec.kind == "json":
                # NOTE: no free whitespace between tokens: small models otherwise tend to emit whitespace
                # until max_tokens (vLLM's disable_any_whitespace).
                return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return xgr.Grammar.from_regex(spec.value)
            if spec.kind == "choice":
                return xgr.Grammar.from_ebnf(choice_grammar(spec.value))
            return xgr.Grammar.from_ebnf(spec.value)
        except Exception as exc:  # xgrammar raises RuntimeError / its own error types, all with a message
            raise ValueError(f"{spec.field}: {_clean_error(exc)}") from None


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (string literals with JSON-style escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def apply_grammar_bitmask(logits: torch.Tensor, requests: list[Request]) -> None:
    """Mask, in place, every row of ``logits`` ([B, V] float32 on the host) whose request has a grammar to
    the tokens it allows next; rows without one are left alone. One bitmask, one call for the batch."""
    rows = [row for row, request in enumerate(requests) if request.grammar is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(requests), logits.shape[-1])
    for row in rows:
        requests[row].grammar.fill_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows)


def apply_draft_bitmask(logits: torch.Tensor, request: Request, drafts: list[int]) -> None:
    """Mask, in place, a verify chunk's logits ([len(drafts) + 1, V]) row by row along the drafts."""
    if request.grammar is None:
        return
    import xgrammar as xgr

    bitmask = request.grammar.draft_bitmask(drafts, logits.shape[-1])
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])


__all__ = ["RequestGrammar", "StructuredOutputManager", "apply_draft_bitmask", "apply_grammar_bitmask",
           "choice_grammar"]
