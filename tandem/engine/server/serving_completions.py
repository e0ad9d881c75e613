"""``POST /v1/completions``: prompts -> engine requests -> an OpenAI text_completion (or its SSE stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from tandem.engine.server.continuation import SeenText, check_resumable, continuation_overrides, with_token_ids
from tandem.engine.server.generation import (
    Collected,
    GenContext,
    collect,
    merge_streams,
    raise_delta_error,
    sse_stream,
    until_disconnect,
    usage,
)
from tandem.engine.server.sampling import sampling_params, structured_output
from tandem.engine.server.state import ServerState
from tandem.protocol.errors import APIError, from_value_error
from tandem.protocol.openai import CompletionRequest
from tandem.web.errors import sse_event


async def serve_completion(state: ServerState, body: CompletionRequest, request: Request):
    """Validate, submit and answer one completions request."""
    model = state.check_model(body.model)
    state.check_ready()
    engine = state.llm
    resumed = body.tandem_continuation
    # A resumed stream's prompt is the original prompt's token ids plus the output so far (continuation.py).
    prompts = [list(resumed.prompt_token_ids)] if resumed is not None else completion_prompts(body)
    try:
        if body.suffix:
            raise ValueError("suffix: not supported")
        kv_params = body.kv_params()
        spec = structured_output(body)
        check_resumable(resumed, body.n, echo=body.echo)
        prompt_ids = [p if isinstance(p, list) else engine.tokenize(p, body.add_special_tokens) for p in prompts]
        if any(not ids for ids in prompt_ids):
            raise APIError(400, "prompt: must not be empty", param="prompt")
        params = [sampling_params(body, body.max_tokens, body.logprobs, max(1, state.max_model_len - len(ids)),
                                  state.vocab_size, spec, **continuation_overrides(resumed)) for ids in prompt_ids]
    except ValueError as exc:
        raise from_value_error(exc) from None
    for ids, p in zip(prompt_ids, params):
        state.check_length(len(ids), p, "prompt")
    if body.echo and params[0].logprobs is not None:
        params = [p.clone(prompt_logprobs=p.logprobs) for p in params]
    ctx = GenContext(state, request, model, kv_params, body.request_id)
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else "" for p in prompts]
    if body.stream:
        return StreamingResponse(sse_stream(ctx, _stream(ctx, prompt_ids, params, texts, body)),
                                 media_type="text/event-stream")
    result = await until_disconnect(request, collect(ctx, prompt_ids, params))
    return _response(ctx, result, prompt_ids, params, texts, body)


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one string, one token list, or a batch of either."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def completion_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]],
                        k: int, text_offset: int, prefix: list | None = None) -> dict:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    entries = list(prefix or []) + list(zip(token_ids, logprobs))
    for tok, lp in entries:
        s = state.token_text(tok)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if lp is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(lp.get(tok))
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        tops.append({state.token_text(t): v for t, v in ranked})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _response(ctx: GenContext, result: Collected, prompt_ids, params, texts, body) -> dict:
    state = ctx.state
    choices = []
    completion_tokens = 0
    for (i, j), c in sorted(result.choices.items()):
        p = params[i]
        text = (texts[i] + c.text) if body.echo else c.text
        lp = None
        if p.logprobs is not None:
            prefix = None
            if body.echo:
                plp = result.prompt_logprobs.get(i) or []
                prefix = list(zip(prompt_ids[i], plp + [None] * (len(prompt_ids[i]) - len(plp))))
            lp = completion_logprobs(state, c.token_ids, c.logprobs, p.logprobs, 0, prefix)
        completion_tokens += len(c.token_ids)
        if body.tandem_continuation is not None:
            text = text[body.tandem_continuation.num_output_chars:]
        choices.append(with_token_ids({"index": i * p.n + j, "text": text, "logprobs": lp,
                                       "finish_reason": c.finish_reason, "stop_reason": c.stop_reason},
                                      c.token_ids, body.return_token_ids))
        if body.return_token_ids:
            choices[-1]["prompt_token_ids"] = prompt_ids[i]
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    resp = {"id": f"cmpl-{ctx.response_id}", "object": "text_completion", "created": ctx.created,
            "model": ctx.model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, result.cached_tokens)}
    if result.kv_transfer_params is not None:
        resp["kv_transfer_params"] = result.kv_transfer_params
    return resp


async def _stream(ctx: GenContext, prompt_ids, params, texts, body) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": f"cmpl-{ctx.response_id}", "object": "text_completion", "created": ctx.created, "model": ctx.model}
    completion_tokens = 0
    cached = 0
    echoed: set[tuple[int, int]] = set()
    offsets: dict[tuple[int, int], int] = {}
    seen = SeenText(body.tandem_continuation)
    prompt_ids_sent: set[int] = set()
    async for i, d in merge_streams(ctx.streams(prompt_ids, params)):
        ctx.tracker.on_delta(d)
        raise_delta_error(d)
        p = params[i]
        key = (i, d.index)
        text = seen.new(key, d.new_text)
        if body.echo and key not in echoed:
            echoed.add(key)
            text = texts[i] + text
        completion_tokens += len(d.new_token_ids)
        lp = None
        if p.logprobs is not None and d.new_token_ids:
            lp = completion_logprobs(ctx.state, d.new_token_ids, d.new_logprobs, p.logprobs, offsets.get(key, 0))
        offsets[key] = offsets.get(key, 0) + len(text)
        if d.finished:
            cached = max(cached, d.num_cached_tokens)
        # NOTE: with return_token_ids, tokens whose text is held back (a possible stop string) are sent too.
        if not text and not d.finished and lp is None and not (body.return_token_ids and d.new_token_ids):
            continue
        choice = with_token_ids({"index": i * p.n + d.index, "text": text, "logprobs": lp,
                                 "finish_reason": d.finish_reason if d.finished else None,
                                 "stop_reason": d.stop_reason if d.finished else None},
                                d.new_token_ids, body.return_token_ids)
        if body.return_token_ids and i not in prompt_ids_sent:
            prompt_ids_sent.add(i)
            choice["prompt_token_ids"] = prompt_ids[i]
        yield sse_event({**base, "choices": [choice]})
    if include_usage:
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        yield sse_event({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached)})
