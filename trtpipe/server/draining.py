"""Graceful drain for HTTP/1.1 keep-alive: nothing a client sent is reset by a shutdown.

Closing the listener stops new connections, but clients keep sending on connections they already
hold open, and closing those under a request resets it. This ASGI middleware counts the requests
admitted before the drain, so the server can wait for them (running and queued alike) to finish;
while draining, their responses carry ``Connection: close``, and any other request that arrives
on an open connection gets a clean 503 with ``Connection: close`` (health probes and ``/metrics``
still answer, readiness says 503), so the client retries elsewhere instead of seeing a reset.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths that still answer while draining: probes (readiness reports 503 itself) and metrics.
ANSWERED_WHILE_DRAINING = ("/v2/health/", "/metrics")
CLOSE = (b"connection", b"close")
DRAINING_MESSAGE = "the server is shutting down; send the request to another replica"


class DrainingMiddleware:
    """Wraps the HTTP app. After :meth:`start_draining` (call it once the listeners are closed),
    :meth:`wait_idle` returns when every admitted request has finished."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.draining = False
        self.active = 0
        # peers of connections accepted before the listeners closed that sent nothing yet:
        # their first request was sent before the drain, so it is served
        self._first_request_of: set[Any] = set()
        self._idle: asyncio.Future[None] | None = None  # made only when the drain waits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and not scope["path"].startswith(ANSWERED_WHILE_DRAINING):
            client = tuple(scope.get("client") or ())
            if client not in self._first_request_of:
                await reject_draining(scope, send)
                return
            self._first_request_of.discard(client)

        async def send_closing_when_draining(message: Message) -> None:
            if self.draining and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), CLOSE]}
            await send(message)

        self.active += 1
        try:
            await self.app(scope, receive, send_closing_when_draining)
        finally:
            self.active -= 1
            if not self.active and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    def start_draining(self, unanswered_connections: Any = ()) -> None:
        """From now on: 503 + close, except the first request of ``unanswered_connections``
        (client addresses of connections accepted before the listeners closed that have not
        sent a request yet)."""
        self._first_request_of = {tuple(c) for c in unanswered_connections if c}
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no admitted request is running; False if ``timeout_s`` passed first."""
        if not self.active:
            return True
        if self._idle is None or self._idle.done():
            self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


async def reject_draining(scope: Scope, send: Send) -> None:
    """503 + ``Connection: close``, in OpenAI's error shape under ``/v1``."""
    if scope["path"].startswith("/v1/"):
        error: Any = {
            "message": DRAINING_MESSAGE,
            "type": "server_error",
            "param": None,
            "code": None,
        }
    else:
        error = DRAINING_MESSAGE
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        CLOSE,
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
