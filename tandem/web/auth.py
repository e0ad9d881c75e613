"""API-key checks, shared by the engine's server and the router.

A key is accepted as ``Authorization: Bearer <key>`` (OpenAI clients) or ``x-api-key: <key>`` (Anthropic clients).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable, Iterable

from tandem.protocol.errors import APIError
from tandem.web.errors import error_response, is_anthropic_path

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
UNAUTHORIZED = "Invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


class APIKeys:
    """The accepted keys; an empty set accepts every request."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def authorized(self, authorization: str | None, x_api_key: str | None) -> bool:
        """Whether the request's ``Authorization`` / ``x-api-key`` headers carry an accepted key."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = [token.strip().encode()] if scheme.lower() == "bearer" else []
        if x_api_key is not None:
            given.append(x_api_key.strip().encode())
        # Compare against every key in constant time, without short-circuiting.
        matched = False
        for candidate in given:
            for key in self._keys:
                matched |= hmac.compare_digest(candidate, key)
        return matched


class RequestContextMiddleware:
    """Request ids and API-key checks on protected paths, as plain ASGI.

    NOTE: not Starlette's BaseHTTPMiddleware, which hides client disconnects from the handlers
    (and so would keep generating for clients that are gone).
    """

    def __init__(self, app, keys: APIKeys, on_unauthorized: Callable[[], None] | None = None) -> None:
        self.app = app
        self.keys = keys
        self.on_unauthorized = on_unauthorized

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        if self.keys and path.startswith(PROTECTED_PREFIXES) and \
                not self.keys.authorized(headers.get("authorization"), headers.get("x-api-key")):
            if self.on_unauthorized is not None:
                self.on_unauthorized()
            err = APIError(401, UNAUTHORIZED, code="invalid_api_key")
            await error_response(err, {"x-request-id": request_id}, is_anthropic_path(path))(scope, receive, send)
            return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)
