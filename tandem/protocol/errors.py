"""The API's error shapes, shared by the engine server and the router (torch-free and server-free).

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic: ``{"type": "error", "error": {"type",
"message"}}``. Both with the matching HTTP status. Turning an ``APIError`` into an HTTP response is the servers'
job (``tandem.web.errors``).
"""

from __future__ import annotations

import re

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
    503: "overloaded_error",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-shaped error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict:
    """An Anthropic-shaped error body for an error answered with ``status``."""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class APIError(Exception):
    """An error the API answers with: HTTP status, message, and the offending parameter when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The OpenAI-shaped body."""
        return error_body(self.message, self.type, self.param, self.code)

    def anthropic_body(self) -> dict:
        """The Anthropic-shaped body."""
        return anthropic_error_body(self.status, self.message)


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)(?:[.\[][^:]*)?:")


def from_value_error(exc: ValueError) -> APIError:
    """A ValueError whose message starts with 'field: ...' (or 'field.sub: ...') becomes a 400 naming ``field``."""
    message = str(exc)
    m = _FIELD.match(message)
    param = m.group(1) if m else None
    code = "context_length_exceeded" if "max_model_len" in message or "maximum context length" in message else None
    return APIError(400, message, param=param, code=code)


def from_validation_errors(errors: list[dict]) -> APIError:
    """A pydantic validation failure as a 400 naming the first offending field (no internals)."""
    parts = []
    param = None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        # Drop pydantic's union-member tags such as 'str' / 'list[int]' from the location.
        loc = [x for x in loc if not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*)", x)]
        field = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        msg = err.get("msg", "is invalid")
        if err.get("type") == "value_error":
            # Our validators raise "field: reason"; pydantic prefixes "Value error, ".
            reason = from_value_error(ValueError(msg.removeprefix("Value error, ")))
            if reason.param is not None:
                param = param or reason.param
                parts.append(reason.message if not loc else f"{field}: {reason.message}")
                continue
        if err.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json")
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "extra_forbidden":
            msg = "is not supported"
        parts.append(f"{field}: {msg}")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)
