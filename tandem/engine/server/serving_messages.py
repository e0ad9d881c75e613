"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API on the engine.

The request is mapped onto the chat machinery (``tandem.protocol.anthropic.to_chat``: same normaliser, same tool
plan and parsers as ``/v1/chat/completions``); the answer is shaped as Anthropic's ``message``, or its event
stream (message_start, content_block_start/delta/stop, message_delta, message_stop).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from tandem.engine.sampling_params import SamplingParams
from tandem.engine.server.generation import (
    GenContext,
    collect,
    merge_streams,
    raise_delta_error,
    stream_error,
    until_disconnect,
)
from tandem.engine.server.serving_chat import render_chat, tool_plan
from tandem.engine.server.state import ServerState
from tandem.protocol.anthropic import CountTokensRequest, MessagesRequest, stop_reason, to_chat
from tandem.protocol.errors import from_value_error
from tandem.protocol.tools import ArgsDelta, CallEnd, CallStart, ParsedCall, TextPiece, ToolPlan, make_parser, parse
from tandem.web.errors import sse_event


def _prepare(state: ServerState, body: MessagesRequest | CountTokensRequest) -> tuple[list[int], ToolPlan, object]:
    chat = to_chat(body)
    choice = body.tool_choice
    if choice is not None and choice.disable_parallel_tool_use and choice.type == "auto" and body.tools:
        raise ValueError("tool_choice.disable_parallel_tool_use: honoured only with tool_choice 'any' or 'tool' "
                         "(one call, grammar-constrained)")
    plan, spec = tool_plan(chat.get("tools"), chat.get("tool_choice"), None, None)
    ids = render_chat(state, chat["messages"], chat.get("tools"))
    return ids, plan, spec


def count_tokens(state: ServerState, body: CountTokensRequest) -> dict:
    """The prompt's token count, as ``/v1/messages`` would render it."""
    state.check_model(body.model)
    state.check_ready()
    try:
        ids, _, _ = _prepare(state, body)
    except ValueError as exc:
        raise from_value_error(exc) from None
    return {"input_tokens": len(ids)}


async def serve_messages(state: ServerState, body: MessagesRequest, request: Request):
    """Validate, submit and answer one Messages API request."""
    model = state.check_model(body.model)
    state.check_ready()
    try:
        kv_params = body.kv_params()
        ids, plan, spec = _prepare(state, body)
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            stop=list(body.stop_sequences or []),
            max_tokens=body.max_tokens,
            structured_output=spec,
        )
    except ValueError as exc:
        raise from_value_error(exc) from None
    state.check_length(len(ids), params, "messages")
    ctx = GenContext(state, request, model, kv_params, body.request_id)
    if body.stream:
        return StreamingResponse(_framed(ctx, _stream(ctx, ids, params, plan)), media_type="text/event-stream")
    result = await until_disconnect(request, collect(ctx, [ids], [params]))
    c = result.choices[(0, 0)]
    content: list[dict] = []
    parser = make_parser(plan)
    text, calls = parse(parser, c.text) if parser is not None else (c.text, [])
    if text or not calls:
        content.append({"type": "text", "text": text or ""})
    content += [_tool_use(call) for call in calls]
    reason, sequence = stop_reason("tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                                   c.stop_reason)
    resp = {"id": f"msg_{ctx.response_id}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": len(ids), "output_tokens": len(c.token_ids),
                      "cache_read_input_tokens": result.cached_tokens}}
    if result.kv_transfer_params is not None:
        resp["kv_transfer_params"] = result.kv_transfer_params
    return resp


def _tool_use(call: ParsedCall) -> dict:
    return {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": call.name,
            "input": json.loads(call.arguments)}


async def _framed(ctx: GenContext, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A failure mid-stream becomes Anthropic's ``error`` event."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except BaseException as exc:
        yield sse_event(stream_error(exc).anthropic_body(), "error")
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        ctx.tracker.done()


async def _stream(ctx: GenContext, ids: list[int], params: SamplingParams, plan: ToolPlan) -> AsyncIterator[bytes]:
    yield sse_event({"type": "message_start", "message": {
        "id": f"msg_{ctx.response_id}", "type": "message", "role": "assistant", "model": ctx.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": len(ids), "output_tokens": 0}}},
        "message_start")
    parser = make_parser(plan)
    index = 0
    text_open = False
    calls = 0
    output_tokens = 0
    finish = (None, None)
    async for _, d in merge_streams(ctx.streams([ids], [params])):
        ctx.tracker.on_delta(d)
        raise_delta_error(d)
        output_tokens += len(d.new_token_ids)
        if parser is None:
            events = [TextPiece(d.new_text)] if d.new_text else []
        else:
            events = parser.feed(d.new_text) + (parser.finish() if d.finished else [])
        for e in events:
            if isinstance(e, TextPiece):
                if not e.text:
                    continue
                if not text_open:
                    yield sse_event({"type": "content_block_start", "index": index,
                                     "content_block": {"type": "text", "text": ""}}, "content_block_start")
                    text_open = True
                yield sse_event({"type": "content_block_delta", "index": index,
                                 "delta": {"type": "text_delta", "text": e.text}}, "content_block_delta")
                continue
            if isinstance(e, ArgsDelta):
                yield sse_event({"type": "content_block_delta", "index": index,
                                 "delta": {"type": "input_json_delta", "partial_json": e.text}}, "content_block_delta")
                continue
            if isinstance(e, CallEnd):
                yield sse_event({"type": "content_block_stop", "index": index}, "content_block_stop")
                index += 1
                calls += 1
                continue
            if text_open:
                yield sse_event({"type": "content_block_stop", "index": index}, "content_block_stop")
                text_open, index = False, index + 1
            if isinstance(e, CallStart):  # a streamed call: its arguments follow as input_json_delta pieces
                yield sse_event({"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": e.name, "input": {}}},
                    "content_block_start")
                continue
            block = _tool_use(e)
            yield sse_event({"type": "content_block_start", "index": index,
                             "content_block": {**block, "input": {}}}, "content_block_start")
            yield sse_event({"type": "content_block_delta", "index": index,
                             "delta": {"type": "input_json_delta", "partial_json": e.arguments}}, "content_block_delta")
            yield sse_event({"type": "content_block_stop", "index": index}, "content_block_stop")
            index += 1
            calls += 1
        if d.finished:
            finish = stop_reason("tool_calls" if calls and d.finish_reason == "stop" else d.finish_reason,
                                 d.stop_reason)
    if text_open:
        yield sse_event({"type": "content_block_stop", "index": index}, "content_block_stop")
    yield sse_event({"type": "message_delta", "delta": {"stop_reason": finish[0], "stop_sequence": finish[1]},
                     "usage": {"output_tokens": output_tokens}}, "message_delta")
    yield sse_event({"type": "message_stop"}, "message_stop")
