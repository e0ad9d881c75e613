"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes)."""

from __future__ import annotations

from tandem.engine.server.serving_chat import render_chat
from tandem.engine.server.state import ServerState
from tandem.protocol.errors import APIError, from_value_error
from tandem.protocol.openai import DetokenizeRequest, TokenizeRequest


def tokenize(state: ServerState, body: TokenizeRequest) -> dict:
    """A prompt or chat messages -> token ids (chat through the same normaliser as generation)."""
    state.check_model(body.model)
    state.check_ready()
    try:
        if body.messages is not None:
            ids = render_chat(state, body.messages, body.tools, body.add_generation_prompt,
                              chat_template_kwargs=body.chat_template_kwargs)
        elif body.prompt is not None:
            ids = state.llm.tokenize(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "prompt: give either prompt or messages", param="prompt")
    except ValueError as exc:
        raise from_value_error(exc) from None
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


def detokenize(state: ServerState, body: DetokenizeRequest) -> dict:
    """Token ids -> text."""
    state.check_model(body.model)
    state.check_ready()
    vocab = state.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"tokens: ids must be in [0, {vocab})", param="tokens")
    tokenizer = state.llm.tokenizer
    return {"prompt": tokenizer.decode(body.tokens) if tokenizer else ""}
