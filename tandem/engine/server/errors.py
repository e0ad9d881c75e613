"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

NOTE: torch-free; the router answers with the same class, so clients see one error API everywhere.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

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


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_FIELD = re.compile(r"^([a-z_][a-z0-9_]*):")


def from_value_error(exc: ValueError) -> APIError:
    """A ValueError whose message starts with 'field: ...' becomes a 400 naming that parameter."""
    message = str(exc)
    m = _FIELD.match(message)
    param = m.group(1) if m else None
    code = "context_length_exceeded" if "max_model_len" in message or "maximum context length" in message else None
    return APIError(400, message, param=param, code=code)


def from_validation_errors(errors: list[dict]) -> APIError:
    """A pydantic/FastAPI validation failure as a 400 naming the first offending field (no internals)."""
    parts = []
    param = None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        # Drop pydantic's union-member tags such as 'str' / 'list[int]' from the location.
        loc = [x for x in loc if not re.fullmatch(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*)", x)]
        field = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        msg = err.get("msg", "is invalid")
        if err.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON", code="invalid_json")
        if err.get("type") == "missing":
            msg = "is required"
        parts.append(f"{field}: {msg}")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)
