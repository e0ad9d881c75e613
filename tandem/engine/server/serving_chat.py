"""``POST /v1/chat/completions``: messages -> the chat template (through ``tandem.protocol.chat``) -> engine
request -> an OpenAI chat.completion (or its SSE stream of chat.completion.chunk)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from tandem.engine.sampling_params import SamplingParams
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
from tandem.protocol.chat import chat_template_input, validate_tools
from tandem.protocol.errors import from_value_error
from tandem.protocol.openai import ChatCompletionRequest
from tandem.protocol.structured_output import StructuredOutputSpec
from tandem.protocol.tools import (
    ArgsDelta,
    CallStart,
    ParsedCall,
    TextPiece,
    ToolPlan,
    make_parser,
    parse,
    plan_tools,
)
from tandem.web.errors import sse_event


def render_chat(state: ServerState, messages, tools=None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs=None) -> list[int]:
    """Messages (and tools) -> prompt token ids, through the one normaliser the router uses too."""
    inp = chat_template_input(messages, tools, state.template_features(), chat_template_kwargs)
    return state.llm.apply_chat_template(
        inp.messages, add_generation_prompt and not continue_final_message,
        **({"continue_final_message": True} if continue_final_message else {}),
        **inp.template_kwargs(),
    )


def tool_plan(tools, tool_choice, parallel_tool_calls: bool | None,
              spec: StructuredOutputSpec | None) -> tuple[ToolPlan, StructuredOutputSpec | None]:
    """The request's tool plan, and the structured output to generate under: a forced call's JSON schema."""
    plan = plan_tools(validate_tools(tools), tool_choice)
    if plan.mode == "auto" and parallel_tool_calls is False:
        raise ValueError("parallel_tool_calls: false is honoured only with tool_choice 'required' or a named "
                         "function (one call, grammar-constrained)")
    if plan.mode != "forced":
        return plan, spec
    if spec is not None:
        raise ValueError(f"tool_choice: a forced tool call cannot be combined with {spec.field.split('.')[0]}")
    return plan, StructuredOutputSpec("json", plan.schema, field="tools")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call_json(call: ParsedCall, call_id: str, index: int | None = None) -> dict:
    """One entry of OpenAI's ``tool_calls`` (with ``index`` in a stream's delta)."""
    out = {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": index, **out} if index is not None else out


async def serve_chat(state: ServerState, body: ChatCompletionRequest, request: Request):
    """Validate, submit and answer one chat completions request."""
    model = state.check_model(body.model)
    state.check_ready()
    try:
        kv_params = body.kv_params()
        plan, spec = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, structured_output(body))
        resumed = body.tandem_continuation
        check_resumable(resumed, body.n, tools=plan.mode != "none")
        # A resumed stream's prompt is the rendered conversation's token ids plus the output so far.
        ids = list(resumed.prompt_token_ids) if resumed is not None else render_chat(
            state, body.messages, body.tools, body.add_generation_prompt, body.continue_final_message,
            body.chat_template_kwargs)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                 max(1, state.max_model_len - len(ids)), state.vocab_size, spec,
                                 **continuation_overrides(resumed))
    except ValueError as exc:
        raise from_value_error(exc) from None
    state.check_length(len(ids), params, "messages")
    ctx = GenContext(state, request, model, kv_params, body.request_id)
    if body.stream:
        return StreamingResponse(sse_stream(ctx, _stream(ctx, ids, params, body, plan)),
                                 media_type="text/event-stream")
    result = await until_disconnect(request, collect(ctx, [ids], [params]))
    response = _response(ctx, result, ids, params, plan)
    if resumed is not None or body.return_token_ids:
        _resumed_response(response, result, ids, body)
    return response


def _resumed_response(response: dict, result: Collected, ids: list[int], body: ChatCompletionRequest) -> None:
    """A whole response of a resumed request holds only the new text; with return_token_ids, the token ids."""
    seen = SeenText(body.tandem_continuation)
    for choice, (_, c) in zip(response["choices"], sorted(result.choices.items())):
        if isinstance(choice["message"].get("content"), str):
            choice["message"]["content"] = seen.new(choice["index"], choice["message"]["content"])
        with_token_ids(choice, c.token_ids, body.return_token_ids)
    if body.return_token_ids:
        response["prompt_token_ids"] = ids


def chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict:
    """The chat ``logprobs`` object (content: token, logprob, bytes, top_logprobs)."""
    content = []
    for tok, lp in zip(token_ids, logprobs):
        s = state.token_text(tok)
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
        content.append({
            "token": s, "logprob": lp.get(tok), "bytes": list(s.encode()),
            "top_logprobs": [{"token": (t_s := state.token_text(t)), "logprob": v, "bytes": list(t_s.encode())}
                             for t, v in ranked],
        })
    return {"content": content}


def _deltas(events: list, calls_sent: dict[int, int], index: int) -> list[dict]:
    """Stream deltas for parser events, in order, OpenAI's way: text as ``content``; a call as a first
    ``tool_calls`` delta with its index, id, type and name, then its arguments piece by piece (a call parsed
    whole comes as one delta). ``calls_sent[index]`` counts the choice's finished calls."""
    deltas: list[dict] = []
    for e in events:
        if isinstance(e, TextPiece):
            if not e.text:
                continue
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += e.text
            else:
                deltas.append({"content": e.text})
        elif isinstance(e, ParsedCall):
            deltas.append({"tool_calls": [tool_call_json(e, new_call_id(), calls_sent[index])]})
            calls_sent[index] += 1
        elif isinstance(e, CallStart):
            deltas.append({"tool_calls": [{"index": calls_sent[index], "id": new_call_id(), "type": "function",
                                           "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, ArgsDelta):
            deltas.append({"tool_calls": [{"index": calls_sent[index], "function": {"arguments": e.text}}]})
        else:  # CallEnd
            calls_sent[index] += 1
    return deltas


def _response(ctx: GenContext, result: Collected, ids: list[int], params: SamplingParams, plan: ToolPlan) -> dict:
    choices = []
    completion_tokens = 0
    for (_, j), c in sorted(result.choices.items()):
        completion_tokens += len(c.token_ids)
        message: dict = {"role": "assistant", "content": c.text}
        finish_reason = c.finish_reason
        parser = make_parser(plan)
        if parser is not None:
            content, calls = parse(parser, c.text)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [tool_call_json(call, new_call_id()) for call in calls]}
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choices.append({
            "index": j,
            "message": message,
            "logprobs": chat_logprobs(ctx.state, c.token_ids, c.logprobs, params.logprobs or 0)
            if params.logprobs is not None else None,
            "finish_reason": finish_reason,
            "stop_reason": c.stop_reason,
        })
    resp = {"id": f"chatcmpl-{ctx.response_id}", "object": "chat.completion", "created": ctx.created,
            "model": ctx.model, "choices": choices,
            "usage": usage(len(ids), completion_tokens, result.cached_tokens)}
    if result.kv_transfer_params is not None:
        resp["kv_transfer_params"] = result.kv_transfer_params
    return resp


async def _stream(ctx: GenContext, ids: list[int], params: SamplingParams, body,
                  plan: ToolPlan) -> AsyncIterator[bytes]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": f"chatcmpl-{ctx.response_id}", "object": "chat.completion.chunk", "created": ctx.created,
            "model": ctx.model}
    completion_tokens = 0
    cached = 0
    parsers = {j: make_parser(plan) for j in range(params.n)}
    calls_sent = dict.fromkeys(range(params.n), 0)
    for j in range(params.n):
        yield sse_event({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}],
                         **({"prompt_token_ids": ids} if body.return_token_ids and j == 0 else {})})
    seen = SeenText(body.tandem_continuation)
    async for _, d in merge_streams(ctx.streams([ids], [params])):
        ctx.tracker.on_delta(d)
        raise_delta_error(d)
        completion_tokens += len(d.new_token_ids)
        if d.finished:
            cached = max(cached, d.num_cached_tokens)
        lp = None
        if params.logprobs is not None and d.new_token_ids:
            lp = chat_logprobs(ctx.state, d.new_token_ids, d.new_logprobs, params.logprobs)
        parser = parsers[d.index]
        new_text = seen.new(d.index, d.new_text)
        if parser is None:
            events = [TextPiece(new_text)] if new_text else []
        else:
            events = parser.feed(new_text) + (parser.finish() if d.finished else [])
        deltas = _deltas(events, calls_sent, d.index)
        if not deltas and (d.finished or lp is not None or (body.return_token_ids and d.new_token_ids)):
            deltas.append({})  # NOTE: with return_token_ids, tokens whose text is held back are sent too
        # NOTE: text held back (a possible stop string or tool call) still sends its tokens' logprobs.
        finish_reason = d.finish_reason
        if calls_sent[d.index] and finish_reason == "stop":
            finish_reason = "tool_calls"
        for k, delta in enumerate(deltas):
            last = d.finished and k == len(deltas) - 1
            choice = with_token_ids({"index": d.index, "delta": delta, "logprobs": lp if k == 0 else None,
                                     "finish_reason": finish_reason if last else None},
                                    d.new_token_ids if k == 0 else [], body.return_token_ids)
            if last:
                choice["stop_reason"] = d.stop_reason
            yield sse_event({**base, "choices": [choice]})
    if include_usage:
        yield sse_event({**base, "choices": [], "usage": usage(len(ids), completion_tokens, cached)})
