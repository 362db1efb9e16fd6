"""The ASGI layer every HTTP request passes first: bearer token, body size limit, access log.

It wraps the whole application, so nothing (not even `/v1/health`) answers without the token
when one is set, and no route reads more than the size limit: a declared Content-Length over it
is refused before the body is read, and a body streamed without one is cut off the moment it
passes the limit (413 either way).

The access log line is method, path (no query string: it may hold a prompt), status and time;
request content, error messages and DICOM values are never logged, so the service log holds no
patient data.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .service_errors import RequestTooLargeError, UnauthorizedError, error_body

log = logging.getLogger("citrus_edge.cart.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str]) -> None:
    """A complete JSON response straight on the ASGI channel."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class HttpGuard:
    """Token check, size limit and access log around `app`; `token` None checks no token."""

    def __init__(self, app: App, token: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self._expected = None if token is None else f"Bearer {token}".encode()

    def _authorized(self, scope: Scope) -> bool:
        if self._expected is None:
            return True
        given = _header(scope, b"authorization") or b""
        return hmac.compare_digest(given, self._expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        t0 = time.perf_counter()
        status = [0]

        async def send_seen(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_seen)
        finally:
            log.info(
                "%s %s %d %.1f ms",
                scope.get("method", "?"),
                scope.get("path", "?"),
                status[0],
                (time.perf_counter() - t0) * 1e3,
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._authorized(scope):
            error = UnauthorizedError(
                "this service needs the header 'Authorization: Bearer <token>' with the token "
                "of its --token-file"
            )
            await send_json(send, 401, error_body(error), {"www-authenticate": "Bearer"})
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_json(send, 413, error_body(self._too_large(int(declared))), {})
            return
        seen = [0]
        started = [False]

        async def counted_receive() -> Message:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.max_body_bytes:
                raise self._too_large(seen[0])
            return message

        async def send_started(message: Message) -> None:
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, send_started)
        except RequestTooLargeError as e:  # raised outside a route's own error handling
            if started[0]:
                raise
            await send_json(send, 413, error_body(e), {})

    def _too_large(self, size: int) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"request body: {size} bytes or more, over the service's limit of "
            f"{self.max_body_bytes} bytes (--max-request-bytes)"
        )
