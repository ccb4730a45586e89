"""The gateway's two guards, as plain ASGI middleware so they cover HTTP and WebSocket alike.

- `BearerTokenMiddleware`: with `--http-token`, every request needs `Authorization: Bearer T`
  (a browser page and its WebSocket may pass `?token=T` instead, as headers cannot be set there).
- `BodyLimitMiddleware`: request bodies beyond the cap get 413 before they are read whole.
"""

from __future__ import annotations

import hmac
import json
import time
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

from protocol import constants as C


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    body = {"message_type": "error_response", "request_id": None, "final": True, "success": False,
            "error": message, "error_code": code, "errors": [], "warnings": [],
            "execution_time": 0.0, "timestamp": time.time(), "data": None}
    return status, json.dumps(body).encode()


async def _send_error(send, status: int, payload: bytes, extra_headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": payload})


class BearerTokenMiddleware:
    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _allowed(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization" and value[:7].lower() == b"bearer " \
                    and hmac.compare_digest(value[7:].strip(), self.token):
                return True
        query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        return any(hmac.compare_digest(t.encode(), self.token) for t in query.get("token", []))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "bearer token required"})
            return
        status, payload = _error(401, C.VALIDATION_ERROR, "missing or wrong bearer token")
        await _send_error(send, status, payload, [(b"www-authenticate", b"Bearer")])


class BodyTooLarge(HTTPException):
    """Raised from the body stream; the app's HTTPException handler answers 413 with the
    contract's error body (FastAPI lets HTTPException through its body parsing)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body larger than {max_bytes} bytes")


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body") or b"")
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        status, payload = _error(413, C.MALFORMED_MESSAGE,
                                 f"request body larger than {self.max_bytes} bytes")
        await _send_error(send, status, payload)
