"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

# The same types as the engine's server (tandem/engine/server/errors.py), so clients see one API.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 500: "internal_server_error",
          502: "upstream_error", 503: "service_unavailable", 504: "upstream_error"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class RequestError(Exception):
    """A request the router answers itself with an OpenAI-style error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=headers)


def sse_error_event(message: str, code: str) -> bytes:
    """A server-sent event that ends a broken stream: the openai client raises on an ``error`` field."""
    return b"data: " + json.dumps(error_body(message, "server_error", None, code)).encode() + b"\n\n"
