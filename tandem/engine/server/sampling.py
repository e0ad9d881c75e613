"""Request fields -> ``SamplingParams`` (the engine side of the HTTP edge; the schemas are in tandem.protocol)."""

from __future__ import annotations

from typing import Any

from tandem.engine.sampling_params import SamplingParams
from tandem.protocol.openai import SamplingFields
from tandem.protocol.structured_output import StructuredOutputSpec, parse_structured_output


def logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token id strings -> bias in [-100, 100]) checked against the vocabulary."""
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise ValueError(f"logit_bias: keys must be token ids, got {key!r}") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is not in the vocabulary [0, {vocab_size})")
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {value}")
        bias[token] = float(value)
    return bias


def structured_output(body: SamplingFields) -> StructuredOutputSpec | None:
    """The structured output the request asks for (ValueError naming response_format or the extra_body field)."""
    return parse_structured_output(body.model_dump(exclude_none=True))


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None, default_max: int,
                    vocab_size: int, spec: StructuredOutputSpec | None = None, **overrides: Any) -> SamplingParams:
    """``SamplingParams`` for a completions or chat request. Raises ValueError naming the bad field."""
    if body.best_of is not None and body.best_of != body.n:
        raise ValueError(f"best_of: only best_of == n is supported, got {body.best_of}")
    return SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        max_tokens=default_max if max_tokens is None else max_tokens,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=body.prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        structured_output=spec,
        **overrides,
    )
