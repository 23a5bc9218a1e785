"""gRPC served by uvicorn's HTTP/2 (the ``zttp`` parser) as a plain ASGI app.

grpc.aio's server costs about 215 us of CPU per unary call on the machine this project is
measured on, and a c1 round trip of about 640 us before any model work; the same call answered
here costs about 70 us and 385 us (``scripts/grpc_aio_floor.py --server grpcio|uvicorn``,
docs/performance-log.md). On two cores shared with the engine that difference was most of gRPC's
shortfall against HTTP.

The servicer is the same :class:`~trtpipe.server.grpc.InferenceServicer` grpc.aio runs: this
module is only the wire. What the KServe service needs of it, per the gRPC over HTTP/2
protocol: unary and bidirectional-streaming methods, length-prefixed messages (gzip or deflate
when the client compresses them), the receive size limit (RESOURCE_EXHAUSTED), ``grpc-timeout``
deadlines (DEADLINE_EXCEEDED), the status and its percent-encoded message in trailers, and
UNAVAILABLE once the server drains. ``context`` offers ``abort`` and ``invocation_metadata``,
all the servicer uses.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from trtpipe.server.http import inflate
from trtpipe.server.protocol import BodyTooLarge, ProtocolError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ACCEPT_ENCODING = b"identity,deflate,gzip"
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
WATCH_AFTER_S = 0.05  # a unary call running longer starts watching for its client going away
TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
RESERVED_HEADERS = frozenset(
    {"content-type", "te", "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
)


class ClientGone(Exception):
    """The client reset the stream or closed the connection: nothing is left to answer."""


class GrpcError(Exception):
    """Ends a call with ``code`` and ``details`` in its trailers."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Method:
    """One RPC of the service: the servicer's coroutine and its request message class."""

    handler: Callable[..., Any]
    request_type: Any
    streaming: bool  # bidirectional (``stream ... returns stream``); else unary


def service_methods(servicer: Any, service: ServiceDescriptor) -> dict[str, Method]:
    """``/package.Service/Method`` -> :class:`Method` for every method of ``service``."""
    methods = {}
    for method in service.methods:
        if method.client_streaming != method.server_streaming:
            raise ValueError(f"{method.full_name}: half-streaming methods are not supported")
        methods[f"/{service.full_name}/{method.name}"] = Method(
            handler=getattr(servicer, method.name),
            request_type=message_factory.GetMessageClass(method.input_type),
            streaming=method.client_streaming,
        )
    return methods


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses."""

    def __init__(self, headers: list[tuple[bytes, bytes]]):
        self._headers = headers

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise GrpcError(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in self._headers
            if not name.startswith(b":") and name.decode("latin-1") not in RESERVED_HEADERS
        )


class MessageReader:
    """The request stream's length-prefixed messages, read from ASGI ``receive``."""

    def __init__(self, receive: Receive, encoding: str, limit: int):
        self.receive = receive
        self._encoding = encoding
        self._limit = limit
        self._buffer = bytearray()
        self._ended = False

    async def next(self) -> bytes | None:
        """The next message's bytes (inflated), or None once the client closed its side."""
        while True:
            if len(self._buffer) >= 5:
                length = int.from_bytes(self._buffer[1:5], "big")
                if length > self._limit:
                    raise too_large(length, self._limit)
                if len(self._buffer) >= 5 + length:
                    compressed = self._buffer[0]
                    payload = bytes(self._buffer[5 : 5 + length])
                    del self._buffer[: 5 + length]
                    return self._inflate(payload) if compressed else payload
            if self._ended:
                if self._buffer:
                    raise GrpcError(grpc.StatusCode.INTERNAL, "the request ended inside a message")
                return None
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            self._buffer += message.get("body", b"")
            self._ended = not message.get("more_body", False)

    def _inflate(self, payload: bytes) -> bytes:
        if self._encoding in ("", "identity"):
            raise GrpcError(grpc.StatusCode.INTERNAL, "a compressed message without grpc-encoding")
        if self._encoding not in ("gzip", "deflate"):
            raise GrpcError(
                grpc.StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {self._encoding!r}"
            )
        try:
            return inflate(payload, self._encoding, self._limit)
        except BodyTooLarge:
            raise too_large(self._limit + 1, self._limit) from None
        except ProtocolError as exc:  # not valid gzip/deflate data
            raise GrpcError(grpc.StatusCode.INTERNAL, str(exc)) from None


def too_large(size: int, limit: int) -> GrpcError:
    return GrpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"Received message larger than max ({size} vs. {limit}); raise --max-body-mb",
    )


def parse_timeout(value: str | None) -> float | None:
    """Seconds of a ``grpc-timeout`` header (``100m`` = 0.1 s); None when absent."""
    if value is None:
        return None
    match = TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise GrpcError(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {value!r}")
    return int(match.group(1)) * TIMEOUT_UNITS[match.group(2)]


def percent_encode(details: str) -> bytes:
    """``grpc-message`` encoding: printable ASCII but '%' as is, every other byte as %XX."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
        for b in details.encode("utf-8")
    )


def frame(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


class GrpcApp:
    """ASGI app answering the service's RPCs over HTTP/2 (see the module docstring)."""

    def __init__(
        self,
        methods: dict[str, Method],
        max_message_bytes: int,
        draining: Callable[[], bool] = lambda: False,
    ):
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope.get("http_version") != "2" or scope["method"] != "POST":
            await plain_error(send, 400, b"this port serves gRPC: POST over HTTP/2 only\n")
            return
        headers = {name: value for name, value in scope["headers"]}
        kind = headers.get(b"content-type", b"")
        if kind != b"application/grpc" and not kind.startswith(b"application/grpc+"):
            await plain_error(send, 415, b"gRPC requests have content-type application/grpc\n")
            return
        watch = ClientWatch()
        try:
            await self._answer(scope, headers, receive, Call(send), watch)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # cancelled by us because the client went away (Task.uncancel: Python 3.11+, as zttp)
            getattr(watch.task, "uncancel", int)()

    async def _answer(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        receive: Receive,
        call: Call,
        watch: ClientWatch,
    ) -> None:
        try:
            method = self.methods.get(scope["path"])
            if method is None:
                raise GrpcError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {scope['path']}")
            if self.draining():
                raise GrpcError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            timeout = parse_timeout(text(headers.get(b"grpc-timeout")))
            encoding = text(headers.get(b"grpc-encoding")) or "identity"
            call.reader = MessageReader(receive, encoding, self.max_message_bytes)
            call.context = CallContext(scope["headers"])
            run = self._stream if method.streaming else self._unary
            await asyncio.wait_for(run(method, call, watch), timeout)
        except GrpcError as exc:
            await call.finish(exc.code, exc.details)
        except asyncio.TimeoutError:
            await call.finish(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except ClientGone:
            pass
        except Exception as exc:  # a servicer bug: answer it like grpc.aio does, keep serving
            log.exception("gRPC %s failed", scope["path"])
            await call.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        else:
            await call.finish(grpc.StatusCode.OK, "")

    async def _unary(self, method: Method, call: Call, watch: ClientWatch) -> None:
        request = decode(method, await call.reader.next())
        # The request is read: the next thing ``receive`` reports is the client going away.
        # Listening costs a task, so only calls still running after WATCH_AFTER_S pay it.
        watch.listen_later(call.reader.receive, call)
        try:
            call.hold(await method.handler(request, call.context))
        finally:
            watch.stop_listening()

    async def _stream(self, method: Method, call: Call, watch: ClientWatch) -> None:
        async def requests() -> AsyncIterator[Any]:
            try:
                while (data := await call.reader.next()) is not None:
                    yield decode(method, data)
            except ClientGone:
                watch.client_gone()  # cancels the handler and what it runs, as grpc.aio does

        async for response in method.handler(requests(), call.context):
            await call.reply(response)


class ClientWatch:
    """Cancels a call's task when its client goes away, as grpc.aio cancels the handler, so a
    long generation gives its batch row back."""

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._listener: asyncio.Future[Message] | None = None

    def listen_later(self, receive: Receive, call: Call) -> None:
        def listen() -> None:
            self._listener = asyncio.ensure_future(receive())
            self._listener.add_done_callback(lambda done: self.disconnected(done, call))

        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, listen)

    def stop_listening(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._listener is not None:
            self._listener.cancel()

    def client_gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.task.cancel()

    def disconnected(self, done: asyncio.Future[Message], call: Call) -> None:
        if done.cancelled() or done.exception() is not None or call.finished:
            return
        if done.result()["type"] == "http.disconnect":
            self.client_gone()


def decode(method: Method, data: bytes | None) -> Any:
    if data is None:
        raise GrpcError(grpc.StatusCode.INTERNAL, "the request carried no message")
    try:
        return method.request_type.FromString(data)
    except DecodeError as exc:
        raise GrpcError(grpc.StatusCode.INTERNAL, f"cannot parse the request: {exc}") from None


class Call:
    """One call: its request reader and context, and its response side (headers once, then
    messages, then the trailers)."""

    reader: MessageReader
    context: CallContext

    def __init__(self, send: Send):
        self._send = send
        self._started = False
        self._held = b""
        self.finished = False

    async def _start(self) -> None:
        self._started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/grpc"),
                    (b"grpc-accept-encoding", ACCEPT_ENCODING),
                ],
                "trailers": True,
            }
        )

    async def reply(self, message: Any) -> None:
        """Send one message of a stream now."""
        if not self._started:
            await self._start()
        await self._send({"type": "http.response.body", "body": frame(message), "more_body": True})

    def hold(self, message: Any) -> None:
        """A unary call's message, sent by :meth:`finish` with the end of the body."""
        self._held = frame(message)

    async def finish(self, code: grpc.StatusCode, details: str) -> None:
        self.finished = True
        if not self._started:
            await self._start()
        await self._send({"type": "http.response.body", "body": self._held, "more_body": False})
        trailers = [(b"grpc-status", b"%d" % code.value[0])]
        if details:
            trailers.append((b"grpc-message", percent_encode(details)))
        await self._send({"type": "http.response.trailers", "headers": trailers})


async def plain_error(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
