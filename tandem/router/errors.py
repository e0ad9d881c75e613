"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status."""

from __future__ import annotations

import json

from tandem.engine.server.errors import APIError, error_body

# One error class for the whole API: the engine's server answers with the same shape and types.
RequestError = APIError

__all__ = ["RequestError", "error_body", "sse_error_event"]


def sse_error_event(message: str, code: str) -> bytes:
    """A server-sent event that ends a broken stream: the openai client raises on an ``error`` field."""
    return b"data: " + json.dumps(error_body(message, "server_error", None, code)).encode() + b"\n\n"
