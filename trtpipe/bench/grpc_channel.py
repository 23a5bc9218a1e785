"""The load generator's gRPC client: unary calls on HTTP/2 connections framed by zttp.

A served level times each request from the client's side, so at c1 all of the client's work
lies on the request's path, and on a small machine it also takes a core the server needs.
tritonclient's asyncio client (grpc.aio) costs the bench 335-395 us of CPU per request at c1 on
a 2-core AVX2 machine (null runner), most of it grpc core's poller thread handing each event to
the asyncio loop (a bare grpc.aio channel sending prebuilt bytes saves only 60-70 us of it).
With this channel the bench spends 114-117 us per request, its reply check included: the
caller's request message is prebuilt, framed and written in one call, and the reply is parsed
by zttp, the Zig HTTP/2 core that uvicorn serves gRPC with. It is to gRPC what
:mod:`trtpipe.bench.http_connection` is to HTTP.

Calls share one connection, a stream each, as a grpc.aio channel does, up to the server's
stream limit (then another connection opens). A GOAWAY retires a connection: the calls the
server still takes finish there, later ones go to a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import unquote

import zttp

from trtpipe.errors import InputError

TIMEOUT_S = 300.0  # a reply that never comes fails its call instead of hanging the level
CANCEL = 8  # HTTP/2 error code a client resets an abandoned stream with
DEFAULT_MAX_STREAMS = 100  # until the server's SETTINGS say (RFC 9113's recommended floor)
HEADERS = [
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"trtpipe-bench"),
]


class GrpcStatusError(InputError):
    """The server answered the call with a gRPC status other than OK."""

    def __init__(self, code: int, message: str):
        super().__init__(f"gRPC status {code}: {message}")
        self.code = code


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed length-prefixed gRPC message."""
    return b"\0" + len(message).to_bytes(4, "big") + message


class _Call:
    __slots__ = ("chunks", "future", "headers", "status")

    def __init__(self, future: asyncio.Future[bytes]):
        self.future = future
        self.chunks: list[bytes] = []
        self.headers: Any = []
        self.status = 0


class _H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: zttp frames the calls' streams; each reply resolves its call."""

    def __init__(self, authority: bytes) -> None:
        self.h2 = zttp.Connection(zttp.CLIENT, protocol=zttp.HTTP2)
        self.h2.initiate_connection()
        self.headers = [(b":authority", authority), *HEADERS]
        self.transport: Any = None
        self.calls: dict[int, _Call] = {}
        self.max_streams = DEFAULT_MAX_STREAMS
        self.retiring = False  # a GOAWAY came: no new calls here
        self.closed = False

    def has_room(self) -> bool:
        return not (self.closed or self.retiring) and len(self.calls) < self.max_streams

    def start(self, method: bytes, message: bytes) -> tuple[int, asyncio.Future[bytes]]:
        """Send one unary call; its stream id and the future its reply message resolves."""
        stream = self.h2.send_request(b"POST", method, b"http", self.headers)
        stream.send_data(grpc_frame(message))
        stream.end_message()
        call = _Call(asyncio.get_running_loop().create_future())
        self.calls[stream.stream_id] = call
        self.flush()
        return stream.stream_id, call.future

    def abandon(self, stream_id: int) -> None:
        """Forget a call whose caller gave up, and tell the server (RST_STREAM CANCEL)."""
        if self.calls.pop(stream_id, None) is not None and not self.closed:
            with contextlib.suppress(zttp.ProtocolError):  # the stream ended meanwhile
                self.h2.stream(stream_id).reset(CANCEL)
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.h2.receive_data(data)
            self._read_events()
        except zttp.ProtocolError as exc:
            self._fail_all(ConnectionError(f"bad HTTP/2 from the server: {exc}"))
            self.transport.close()
            return
        self.flush()
        if self.retiring and not self.calls:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(ConnectionError("the server closed the connection"))

    def _read_events(self) -> None:
        while (event := self.h2.next_event()) is not zttp.NEED_DATA:
            if isinstance(event, zttp.Data):
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.chunks.append(event.data)
            elif isinstance(event, zttp.EndOfMessage):
                self._finish(event.stream_id, event.trailers)
            elif isinstance(event, zttp.Response):
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.status, call.headers = event.status_code, event.headers
            elif isinstance(event, zttp.Settings):
                limit = dict(event.params).get(zttp.H2Settings.MAX_CONCURRENT_STREAMS)
                self.max_streams = self.max_streams if limit is None else limit
            elif isinstance(event, zttp.RstStream):
                code = event.error_code
                self._fail(event.stream_id, ConnectionError(f"the server reset the call ({code})"))
            elif isinstance(event, zttp.GoAway):
                self.retiring = True
                for stream_id in [s for s in self.calls if s > event.last_stream_id]:
                    self._fail(stream_id, ConnectionError("the server refused the call (GOAWAY)"))
            elif event is zttp.CONNECTION_CLOSED:
                self.closed = True
                self._fail_all(ConnectionError("the server closed the connection"))
                return

    def _finish(self, stream_id: int, trailers: list[tuple[bytes, bytes]]) -> None:
        call = self.calls.pop(stream_id, None)
        if call is None or call.future.done():
            return
        try:
            call.future.set_result(_reply_message(call, trailers))
        except (InputError, ConnectionError) as exc:
            call.future.set_exception(exc)

    def _fail(self, stream_id: int, exc: Exception) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None and not call.future.done():
            call.future.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        for stream_id in list(self.calls):
            self._fail(stream_id, exc)


def _reply_message(call: _Call, trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The one message of a unary reply; GrpcStatusError for a status other than OK."""
    if call.status != 200:
        raise ConnectionError(f"HTTP {call.status} where a gRPC reply belongs")
    # A status the server sends at once comes in the headers (a trailers-only reply).
    fields = dict(trailers) or dict(call.headers)
    status = fields.get(b"grpc-status")
    if status is None:
        raise ConnectionError("a gRPC reply without grpc-status")
    if status != b"0":
        message = unquote(fields.get(b"grpc-message", b"").decode("utf-8", "replace"))
        raise GrpcStatusError(int(status), message)
    body = b"".join(call.chunks)
    if len(body) < 5 or body[0] != 0:
        raise ConnectionError("a unary gRPC reply without one uncompressed message")
    if int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise ConnectionError("a unary gRPC reply whose length prefix does not match its body")
    return body[5:]


class GrpcChannel:
    """Unary gRPC calls to one server (``HOST:PORT``), many at once."""

    def __init__(self, address: str, timeout_s: float = TIMEOUT_S):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"a gRPC address is HOST:PORT, not {address!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.authority = address.encode()
        self.timeout_s = timeout_s
        self._connections: list[_H2Connection] = []
        self._opening: asyncio.Future[_H2Connection] | None = None

    async def unary(self, method: str, message: bytes) -> bytes:
        """Call ``method`` (``/package.Service/Method``) with a serialized request message and
        return the serialized reply; GrpcStatusError, ConnectionError or TimeoutError if none."""
        connection = await self._connection()
        stream_id, reply = connection.start(method.encode(), message)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, _time_out, reply, self.timeout_s)
        try:
            return await reply
        except BaseException:  # a timeout, or the caller cancelled: the server may stop too
            connection.abandon(stream_id)
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        for connection in self._connections:
            if connection.transport is not None:
                connection.transport.close()
        self._connections.clear()

    async def _connection(self) -> _H2Connection:
        """A connection with room for one more stream: an open one, or a new one (callers
        arriving while one opens wait for it rather than each opening their own)."""
        while True:
            self._connections = [c for c in self._connections if not c.closed]
            for connection in self._connections:
                if connection.has_room():
                    return connection
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
                try:
                    await self._opening
                finally:
                    self._opening = None
            else:
                await asyncio.shield(self._opening)

    async def _open(self) -> _H2Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _H2Connection(self.authority), self.host, self.port
        )
        self._connections.append(connection)
        return connection


def _time_out(reply: asyncio.Future[bytes], seconds: float) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError(f"no reply within {seconds:.0f} s"))
