"""The bench's keep-alive HTTP/1.1 client against a small asyncio server that misbehaves on cue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from trtpipe.bench.http_connection import HttpConnections
from trtpipe.errors import InputError

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """A server that parses POSTs and calls ``handler(body, writer)``; also counts connections."""
    accepted: list[int] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length")
                )
                if not await handler(await reader.readexactly(length), writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


Scenario = Callable[[HttpConnections, list[int]], Awaitable[None]]


def _run(handler: Handler, scenario: Scenario, timeout_s: float = 30.0) -> None:
    """Start a server with ``handler``, run ``scenario(client, accepted)``, close both."""

    async def main() -> None:
        server, port, accepted = await _serve(handler)
        client = HttpConnections(f"http://127.0.0.1:{port}", timeout_s=timeout_s)
        try:
            await scenario(client, accepted)
        finally:
            await client.close()
            server.close()

    asyncio.run(main())


async def _echo(body: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\nX-Echo-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(body), len(body))
        + body
    )
    return True


def test_sequential_requests_reuse_one_connection_and_read_whole_replies() -> None:
    async def scenario(client: HttpConnections, accepted: list[int]) -> None:
        bodies = [b"x" * n for n in (0, 1, 70_000, 5)]  # 70 kB arrives in several reads
        replies = [await client.post("/p", b, {"Content-Type": "text/plain"}) for b in bodies]
        assert [r.body for r in replies] == bodies
        assert [r.status for r in replies] == [200] * 4
        assert replies[2].headers["x-echo-length"] == "70000"  # names lowercased
        assert len(accepted) == 1

    _run(_echo, scenario)


def test_concurrent_requests_each_get_their_own_reply_on_their_own_connection() -> None:
    async def slow_echo(body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.01 * (int(body) % 3))  # replies finish out of order
        return await _echo(body, writer)

    async def scenario(client: HttpConnections, accepted: list[int]) -> None:
        for _ in range(3):
            replies = await asyncio.gather(*(client.post("/p", b"%d" % i, {}) for i in range(8)))
            assert [r.body for r in replies] == [b"%d" % i for i in range(8)]
        assert len(accepted) == 8  # kept alive across the three rounds

    _run(slow_echo, scenario)


def test_chunked_reply_and_connection_close_reply() -> None:
    async def chunked_then_close(body: bytes, writer: asyncio.StreamWriter) -> bool:
        if body == b"chunked":
            writer.write(
                b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False

    async def scenario(client: HttpConnections, accepted: list[int]) -> None:
        reply = await client.post("/p", b"chunked", {})
        assert (reply.status, reply.body) == (503, b"abcde")
        assert (await client.post("/p", b"close", {})).body == b"ok"
        assert (await client.post("/p", b"close", {})).body == b"ok"  # on a new connection
        assert len(accepted) == 2

    _run(chunked_then_close, scenario)


def test_a_dropped_connection_or_a_missing_reply_fails_the_request_not_the_client() -> None:
    async def drop_or_stall(body: bytes, writer: asyncio.StreamWriter) -> bool:
        if body == b"drop":
            return False
        if body == b"stall":
            await asyncio.sleep(5)
        return await _echo(body, writer)

    async def scenario(client: HttpConnections, accepted: list[int]) -> None:
        with pytest.raises(ConnectionError):
            await client.post("/p", b"drop", {})
        with pytest.raises(TimeoutError):
            await client.post("/p", b"stall", {})
        assert (await client.post("/p", b"fine", {})).body == b"fine"

    _run(drop_or_stall, scenario, timeout_s=0.2)


def test_only_plain_http_urls() -> None:
    with pytest.raises(InputError, match="plain http"):
        HttpConnections("https://127.0.0.1:8443")
