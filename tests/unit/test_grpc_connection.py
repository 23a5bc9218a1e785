"""The gRPC HTTP/2 connection retires itself with a graceful GOAWAY before zttp's lifetime
budgets (4,096 streams, 256 peer resets) end it with ENHANCE_YOUR_CALM, and keeps serving the
calls a client sent before it saw the GOAWAY; a reply's frames leave in one write. Driven by
zttp's own client over an in-memory transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

zttp = pytest.importorskip("zttp", reason="uvicorn's HTTP/2 parser zttp needs Python 3.11+")

import uvicorn  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from trtpipe.server import grpc_connection  # noqa: E402
from trtpipe.server.grpc_connection import (  # noqa: E402
    LAST_STREAM_ID,
    ROTATE_AFTER_RESETS,
    ROTATE_AFTER_STREAMS,
    CoalescingTransport,
    GrpcH2Protocol,
)

PATH = b"/inference.GRPCInferenceService/ServerLive"
HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers every call with an empty gRPC reply and status 0."""
    while (await receive()).get("more_body"):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/grpc")],
            "trailers": True,
        }
    )
    await send({"type": "http.response.body", "body": b"\0\0\0\0\0", "more_body": False})
    await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.chunks: list[bytes] = []  # every write, as it came
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += data
        self.chunks.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8001) if name in ("sockname", "peername") else default


class Peer:
    """A zttp HTTP/2 client wired to one GrpcH2Protocol."""

    def __init__(self) -> None:
        config = uvicorn.Config(ok_app, lifespan="off", log_config=None)
        config.load()
        self.transport = Transport()
        self.server = GrpcH2Protocol(config, ServerState(), {})
        self.server.connection_made(self.transport)
        self.client = zttp.Connection(zttp.CLIENT, protocol=zttp.HTTP2)
        self.client.initiate_connection()
        self.goaways: list[Any] = []
        self.answered = 0

    def exchange(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.server.data_received(data)
        if self.transport.written:
            self.client.receive_data(bytes(self.transport.written))
            self.transport.written.clear()
        while (event := self.client.next_event()) is not zttp.NEED_DATA:
            if isinstance(event, zttp.GoAway):
                self.goaways.append(event)
            elif isinstance(event, zttp.EndOfMessage):
                self.answered += 1

    async def settle(self) -> None:
        for _ in range(20):
            self.exchange()
            await asyncio.sleep(0)

    async def call(self, reset: bool = False) -> None:
        stream = self.client.send_request(b"POST", PATH, b"http", HEADERS)
        if reset:
            self.exchange()
            stream.reset(8)  # CANCEL, as a client abandoning its call sends
        else:
            stream.send_data(b"\0\0\0\0\0")
            stream.end_message()
        await self.settle()


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_connection, "RETIRE_GRACE_S", 0.05)


@pytest.mark.parametrize(
    ("reset", "budget"), [(False, ROTATE_AFTER_STREAMS), (True, ROTATE_AFTER_RESETS)]
)
def test_a_connection_retires_gracefully_before_its_budget(reset: bool, budget: int) -> None:
    async def run() -> Peer:
        peer = Peer()
        await peer.settle()
        for _ in range(budget - 1):
            await peer.call(reset)
        assert peer.goaways == []
        await peer.call(reset)
        assert [(g.error_code, g.last_stream_id) for g in peer.goaways] == [(0, LAST_STREAM_ID)]
        answered = peer.answered
        # calls a client sent before the GOAWAY reached it are still served
        for _ in range(5):
            await peer.call()
        assert peer.answered == answered + 5 and not peer.transport.closed
        await asyncio.sleep(0.1)  # the grace period: then the idle connection closes
        await peer.settle()
        assert peer.transport.closed
        return peer

    peer = asyncio.run(run())
    assert all(g.error_code == 0 for g in peer.goaways)  # never ENHANCE_YOUR_CALM (11)
    if not reset:
        assert peer.answered == budget + 5


def frames(chunk: bytes) -> list[tuple[int, int]]:
    """(type, stream id) of each HTTP/2 frame in one write (9-byte frame headers)."""
    found, at = [], 0
    while at + 9 <= len(chunk):
        length = int.from_bytes(chunk[at : at + 3], "big")
        stream = int.from_bytes(chunk[at + 5 : at + 9], "big") & 0x7FFFFFFF
        found.append((chunk[at + 3], stream))
        at += 9 + length
    return found


def test_a_reply_leaves_in_one_write() -> None:
    """HEADERS, DATA and the trailers (a second HEADERS) of the call on stream 1 are written to
    the socket together, not in three system calls."""

    async def run() -> Peer:
        peer = Peer()
        await peer.settle()
        await peer.call()
        return peer

    peer = asyncio.run(run())
    assert peer.answered == 1
    replies = [f for f in map(frames, peer.transport.chunks) if any(s == 1 for _, s in f)]
    assert [[kind for kind, stream in f if stream == 1] for f in replies] == [[1, 0, 1]]


def test_coalescing_transport_writes_once_a_turn_and_flushes_on_close() -> None:
    async def run() -> Transport:
        inner = Transport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"a")
        transport.write(b"")
        transport.write(b"bc")
        assert inner.chunks == []  # nothing leaves within the turn that wrote it
        await asyncio.sleep(0)
        assert inner.chunks == [b"abc"]
        transport.write(b"d")
        transport.close()  # what is pending leaves before the close
        assert inner.chunks == [b"abc", b"d"] and inner.closed
        # everything else is the wrapped transport's own
        assert transport.get_extra_info("peername") == ("127.0.0.1", 8001)
        return inner

    asyncio.run(run())
