"""``APIError`` -> HTTP response, in the shape of the API the request was for (OpenAI or Anthropic)."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

from tandem.protocol.errors import APIError, error_body

ANTHROPIC_PATHS = ("/v1/messages",)


def is_anthropic_path(path: str) -> bool:
    """Requests to the Messages API get Anthropic-shaped errors."""
    return path.startswith(ANTHROPIC_PATHS)


def error_response(err: APIError, headers: dict | None = None, anthropic: bool = False) -> JSONResponse:
    """The JSON response for ``err``: OpenAI's error shape, or Anthropic's."""
    return JSONResponse(err.anthropic_body() if anthropic else err.body(), status_code=err.status, headers=headers)


def sse_event(obj: object, event: str | None = None) -> bytes:
    """One server-sent event (with an ``event:`` line when named, as Anthropic's stream has)."""
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


def sse_error_event(message: str, code: str) -> bytes:
    """A server-sent event that ends a broken stream: the openai client raises on an ``error`` field."""
    return sse_event(error_body(message, "server_error", None, code))
