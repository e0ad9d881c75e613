"""The router's errors: the API's one error class (``tandem.protocol.errors``) with a Starlette response."""

from __future__ import annotations

from starlette.responses import JSONResponse

from tandem.protocol.errors import APIError, error_body
from tandem.web.errors import error_response, sse_error_event

__all__ = ["RequestError", "error_body", "sse_error_event"]


class RequestError(APIError):
    """An ``APIError`` raised on the router's request path; ``response`` answers it (OpenAI or Anthropic shape)."""

    def response(self, headers: dict | None = None, anthropic: bool = False) -> JSONResponse:
        return error_response(self, headers, anthropic)
