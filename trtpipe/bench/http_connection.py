"""The load generator's HTTP/1.1 client: keep-alive connections parsed by httptools.

A served level times each request from the client's side, so whatever the client spends per
request is counted against the server, and on a small machine it also takes the cores the server
needs. aiohttp's request and response objects cost about 0.2 ms per round trip on a 2-core AVX2
machine (against a bare ASGI app answering a fixed reply: p50 300 us, against 96 us here, which
is what a raw socket takes). So the bench keeps its own connections: one request at a time on
each, written in one call and parsed by httptools (the parser uvicorn serves with).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from trtpipe.errors import InputError

TIMEOUT_S = 300.0  # a reply that never comes fails its request instead of hanging the level


class HttpReply:
    """One reply: status, headers (names lowercased) and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body


class _ReplyProtocol(asyncio.Protocol):
    """Feeds what arrives to the parser and resolves the waiting request at each whole reply."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.waiter: asyncio.Future[HttpReply] | None = None
        self.closed = False
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools' parse errors: the connection is unusable
            self._fail(ConnectionError(f"bad HTTP reply: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("the server closed the connection"))

    def on_message_begin(self) -> None:
        self._headers = {}
        self._chunks = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.closed = True
            self.transport.close()
        reply = HttpReply(self.parser.get_status_code(), self._headers, b"".join(self._chunks))
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class HttpConnections:
    """Keep-alive connections to one server, one request in flight on each: a request takes an
    idle connection (or opens one) and gives it back with its reply, so N concurrent callers
    hold N connections, as a pooling client does."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise InputError(f"the bench's HTTP client speaks plain http://HOST:PORT, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[_ReplyProtocol] = []
        self._open: set[_ReplyProtocol] = set()
        self._host_line = f"Host: {parts.netloc}\r\n".encode()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> HttpReply:
        """POST ``body`` and return the whole reply; ConnectionError or TimeoutError if none."""
        connection = await self._take()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[HttpReply] = loop.create_future()
        connection.waiter = waiter
        lines = [b"POST ", path.encode(), b" HTTP/1.1\r\n", self._host_line]
        lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.extend(f"{name}: {value}\r\n".encode() for name, value in headers.items())
        lines.extend((b"\r\n", body))
        connection.transport.write(b"".join(lines))
        timer = loop.call_later(self.timeout_s, _time_out, waiter, self.timeout_s)
        try:
            reply = await waiter
        except BaseException:
            self._drop(connection)
            raise
        finally:
            timer.cancel()
        if connection.closed:
            self._drop(connection)
        else:
            self._idle.append(connection)
        return reply

    async def close(self) -> None:
        for connection in list(self._open):
            self._drop(connection)

    async def _take(self) -> _ReplyProtocol:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._open.discard(connection)
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_ReplyProtocol, self.host, self.port)
        self._open.add(connection)
        return connection

    def _drop(self, connection: _ReplyProtocol) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        if connection.transport is not None:
            connection.transport.close()


def _time_out(waiter: asyncio.Future[HttpReply], seconds: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no reply within {seconds:.0f} s"))
