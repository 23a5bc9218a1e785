"""The two hot routes answered in plain ASGI, ahead of FastAPI's routing and middleware.

``POST /v1/embeddings`` and ``POST /v2/models/{m}[/versions/{v}]/infer`` carry nearly all of the
traffic, and a profile of the server with a zero-cost runner showed FastAPI's layers (routing,
dependency solving, exception and telemetry middleware, response wrappers) costing more CPU per
request than the model path itself. Here those two routes read the body, call the same request
functions the FastAPI routes call (:func:`~trtpipe.server.http.embeddings_reply`,
:func:`~trtpipe.server.http.infer_reply`), and send the reply, with the same errors in the same
shapes. Everything else (other paths, generation models, other methods) goes to FastAPI, which
also keeps documenting these routes in ``/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from trtpipe.server.errors import classify
from trtpipe.server.http import (
    HEADER_LENGTH,
    embeddings_reply,
    infer_reply,
    inflate,
    openai_error_body,
)
from trtpipe.server.protocol import BodyTooLarge, ProtocolError
from trtpipe.server.repository import ModelRepository

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODELS = "/v2/models/"
INFER = "/infer"
JSON_TYPE = (b"content-type", b"application/json")
BINARY_TYPE = (b"content-type", b"application/octet-stream")


class FastPath:
    """ASGI app: the hot routes here, everything else to ``app`` (the FastAPI application)."""

    def __init__(self, app: ASGIApp, repository: ModelRepository, max_body_bytes: int):
        self.app = app
        self.repository = repository
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/v1/embeddings":
                await self._embeddings(scope, receive, send)
                return
            target = infer_target(path)
            if target is not None and target[0] in self.repository.models:
                await self._infer(target, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            payload = await embeddings_reply(
                self.repository, lambda: receive_body(scope, receive, self.max_body_bytes)
            )
        except Exception as exc:
            wire = classify(exc)
            await respond(send, wire.http_status, openai_error_body(wire), [JSON_TYPE])
            return
        await respond(send, 200, payload, [JSON_TYPE])

    async def _infer(
        self, target: tuple[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        name, version = target
        try:
            payload, out_length = await infer_reply(
                self.repository,
                name,
                version,
                lambda: receive_body(scope, receive, self.max_body_bytes),
                header(scope, HEADER_LENGTH.encode()),
            )
        except Exception as exc:
            wire = classify(exc)
            await respond(
                send, wire.http_status, orjson.dumps({"error": wire.message}), [JSON_TYPE]
            )
            return
        if out_length is None:
            await respond(send, 200, payload, [JSON_TYPE])
        else:
            headers = [BINARY_TYPE, (b"inference-header-content-length", b"%d" % out_length)]
            await respond(send, 200, payload, headers)


def infer_target(path: str) -> tuple[str, str] | None:
    """(model, version) of ``/v2/models/{m}/infer`` or ``/v2/models/{m}/versions/{v}/infer``."""
    if not path.startswith(MODELS) or not path.endswith(INFER):
        return None
    parts = path[len(MODELS) : -len(INFER)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 3 and parts[0] and parts[1] == "versions":
        return parts[0], parts[2]
    return None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def receive_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, never holding more than ``limit`` bytes; gzip/deflate inflated.

    Reading past the limit (and dropping it) lets the client receive the 400 instead of a reset.
    """
    chunks: list[bytes] = []
    total = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        else:
            chunks.clear()
    if total > limit:
        declared = header(scope, b"content-length")
        raise BodyTooLarge(
            f"request body is {declared or total} bytes, over the server limit of {limit} bytes "
            "(raise --max-body-mb)"
        )
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = (header(scope, b"content-encoding") or "").lower()
    if encoding in ("gzip", "deflate"):
        return inflate(body, encoding, limit)
    if encoding not in ("", "identity"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    return body


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
