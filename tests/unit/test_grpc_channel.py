"""The bench's own gRPC channel against trtpipe's gRPC server (uvicorn's HTTP/2): replies
whole and in order, statuses as errors, flow control, the server's stream limit, connection
rotation by GOAWAY, timeouts, and a server that goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

pytest.importorskip("zttp", reason="the bench's gRPC channel needs zttp (Python 3.11+)")

from tritonclient.grpc import service_pb2, service_pb2_grpc

from trtpipe.bench.grpc_channel import GrpcChannel, GrpcStatusError
from trtpipe.errors import InputError
from trtpipe.server.grpc_connection import ROTATE_AFTER_STREAMS
from trtpipe.server.grpc_front import serve_servicer

INFER = "/inference.GRPCInferenceService/ModelInfer"
MIB = 1 << 20


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer by model name: ``echo`` returns the first input's raw bytes, ``big`` a
    2 MiB output, ``fail`` an INVALID_ARGUMENT status, ``slow`` sleeps first."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.most_running = 0

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.calls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if request.model_name == "fail":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "100% wrong: ünïcode")
            if request.model_name == "slow":
                await asyncio.sleep(float(request.id or 0.2))
            reply = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
            reply.outputs.add(name="out", datatype="BYTES", shape=[1])
            big = request.model_name == "big"
            reply.raw_output_contents.append(
                bytes(range(256)) * (2 * MIB // 256) if big else request.raw_input_contents[0]
            )
            return reply
        finally:
            self.running -= 1


def request(model: str, payload: bytes = b"", call_id: str = "") -> bytes:
    message = service_pb2.ModelInferRequest(model_name=model, id=call_id)
    message.raw_input_contents.append(payload)
    return message.SerializeToString()


def reply_of(raw: bytes) -> Any:
    return service_pb2.ModelInferResponse.FromString(raw)


def serve(body: Callable[[GrpcChannel, Servicer, Any], Awaitable[None]], **channel: Any) -> None:
    """Runs ``body(channel, servicer, server)`` against a fresh server on a free port."""

    async def run() -> None:
        servicer = Servicer()
        server, port = await serve_servicer("uvicorn", servicer, "127.0.0.1", 0, 64 * MIB)
        client = GrpcChannel(f"127.0.0.1:{port}", **channel)
        try:
            await body(client, servicer, server)
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(run())


def test_concurrent_calls_each_get_their_own_reply() -> None:
    async def body(channel: GrpcChannel, servicer: Servicer, _: Any) -> None:
        payloads = [f"call {i}".encode() * (i + 1) for i in range(50)]
        raws = await asyncio.gather(*(channel.unary(INFER, request("echo", p)) for p in payloads))
        assert [reply_of(r).raw_output_contents[0] for r in raws] == payloads
        assert servicer.calls == 50
        assert len(channel._connections) == 1  # one connection, a stream per call

    serve(body)


def test_a_reply_past_the_flow_control_windows_arrives_whole() -> None:
    """2 MiB: past HTTP/2's 64 KiB stream and connection windows, so it needs the window
    updates zttp sends as the bytes are read."""

    async def body(channel: GrpcChannel, *_: Any) -> None:
        big = reply_of(await channel.unary(INFER, request("big")))
        assert big.raw_output_contents[0] == bytes(range(256)) * (2 * MIB // 256)
        payload = bytes(3 * MIB)  # and a request past them
        echoed = reply_of(await channel.unary(INFER, request("echo", payload)))
        assert echoed.raw_output_contents[0] == payload

    serve(body)


def test_a_status_other_than_ok_is_an_error_with_its_message() -> None:
    async def body(channel: GrpcChannel, *_: Any) -> None:
        with pytest.raises(GrpcStatusError, match="gRPC status 3: 100% wrong: ünïcode") as caught:
            await channel.unary(INFER, request("fail"))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        with pytest.raises(GrpcStatusError, match="gRPC status 12"):  # UNIMPLEMENTED
            await channel.unary("/inference.GRPCInferenceService/NoSuchMethod", b"")
        # the connection carries on
        ok = await channel.unary(INFER, request("echo", b"after"))
        assert reply_of(ok).raw_output_contents[0] == b"after"

    serve(body)


def test_calls_past_the_servers_stream_limit_open_another_connection() -> None:
    async def body(channel: GrpcChannel, servicer: Servicer, _: Any) -> None:
        await channel.unary(INFER, request("echo", b"x"))  # the server's SETTINGS have come
        limit = channel._connections[0].max_streams
        assert 0 < limit < 300
        calls = [channel.unary(INFER, request("slow", b"x", "0.3")) for _ in range(300)]
        replies = await asyncio.gather(*calls)
        assert len(replies) == 300
        assert len(channel._connections) == -(-300 // limit)
        assert servicer.most_running == 300  # none of them waited for another

    serve(body)


def test_calls_go_on_across_the_servers_connection_rotation() -> None:
    """The server retires a connection with a GOAWAY before HTTP/2's stream budget ends it;
    later calls go to a new connection and none fails."""

    async def body(channel: GrpcChannel, servicer: Servicer, _: Any) -> None:
        first = None
        rounds = range(0, ROTATE_AFTER_STREAMS + 200, 8)
        for _ in rounds:
            raws = await asyncio.gather(
                *(channel.unary(INFER, request("echo", str(i).encode())) for i in range(8))
            )
            assert [reply_of(r).raw_output_contents[0] for r in raws] == [
                str(i).encode() for i in range(8)
            ]
            first = first or channel._connections[0]
        assert servicer.calls == len(rounds) * 8
        assert first is not None and first.retiring
        assert first not in channel._connections or first.closed

    serve(body)


def test_a_reply_that_never_comes_times_out_and_the_channel_goes_on() -> None:
    async def body(channel: GrpcChannel, servicer: Servicer, _: Any) -> None:
        with pytest.raises(TimeoutError, match="no reply within"):
            await channel.unary(INFER, request("slow", b"", "5"))
        assert channel._connections[0].calls == {}  # forgotten, and reset on the wire
        ok = await channel.unary(INFER, request("echo", b"next"))
        assert reply_of(ok).raw_output_contents[0] == b"next"

    serve(body, timeout_s=0.2)


def test_a_server_that_goes_away_fails_the_calls_in_flight() -> None:
    async def body(channel: GrpcChannel, servicer: Servicer, server: Any) -> None:
        call = asyncio.ensure_future(channel.unary(INFER, request("slow", b"", "30")))
        while servicer.running == 0:
            await asyncio.sleep(0.01)
        await server.stop(0)  # its grace ends after a second: uvicorn cancels the call
        with pytest.raises(ConnectionError, match="HTTP 500 where a gRPC reply belongs"):
            await asyncio.wait_for(call, 10)
        with pytest.raises(ConnectionError):  # nothing listens any more
            await channel.unary(INFER, request("echo", b"again"))

    serve(body)


def test_a_bad_address_is_an_input_error() -> None:
    with pytest.raises(InputError, match="HOST:PORT"):
        GrpcChannel("localhost")
    with pytest.raises(InputError, match="HOST:PORT"):
        GrpcChannel("localhost:http")
