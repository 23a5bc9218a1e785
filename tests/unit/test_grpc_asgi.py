"""The ASGI gRPC app's wire handling, driven with ASGI messages (no sockets)."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from trtpipe.errors import InputError
from trtpipe.server.grpc_asgi import (
    CallContext,
    GrpcApp,
    GrpcError,
    parse_timeout,
    percent_encode,
    service_methods,
)
from trtpipe.server.grpc_front import SERVICE, resolve_grpc_server

LIVE = "/inference.GRPCInferenceService/ServerLive"
META = "/inference.GRPCInferenceService/ModelMetadata"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


class Servicer:
    """Answers three methods of the service; the others are never called here."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        async def unused(request: Any, context: Any) -> Any:
            raise AssertionError(f"{name} was not expected")

        return unused

    async def ServerLive(self, request: Any, context: CallContext) -> Any:
        await asyncio.sleep(self.delay_s)
        return service_pb2.ServerLiveResponse(live=True)

    async def ModelMetadata(self, request: Any, context: CallContext) -> Any:
        if request.name == "boom":
            raise ValueError("a servicer bug")
        if request.name != "m":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model 'é{request.name}' 100%")
        metadata = dict(context.invocation_metadata())
        return service_pb2.ModelMetadataResponse(name=request.name, platform=metadata["x-who"])

    async def ModelStreamInfer(self, requests: Any, context: CallContext) -> Any:
        async for request in requests:
            yield service_pb2.ModelStreamInferResponse(
                infer_response=service_pb2.ModelInferResponse(id=request.id)
            )


def frame(message: Any, compress: str = "") -> bytes:
    data = message.SerializeToString()
    if compress == "gzip":
        return b"\x01" + len(gzip.compress(data)).to_bytes(4, "big") + gzip.compress(data)
    return b"\x00" + len(data).to_bytes(4, "big") + data


def call(
    path: str,
    chunks: list[bytes],
    headers: dict[str, str] | None = None,
    http_version: str = "2",
    delay_s: float = 0.0,
    draining: bool = False,
    limit: int = 1 << 20,
    servicer: Any = None,
    disconnect_after_s: float | None = None,
) -> list[dict[str, Any]]:
    """Run one call through the app; the ASGI messages it sent. With ``disconnect_after_s`` the
    client goes away that long after its last chunk."""
    servicer = servicer or Servicer(delay_s)
    app = GrpcApp(service_methods(servicer, SERVICE), limit, lambda: draining)
    sent: list[dict[str, Any]] = []
    header_list = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    header_list += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "path": path,
        "headers": header_list,
    }
    incoming = [
        {
            "type": "http.request",
            "body": c,
            "more_body": i < len(chunks) - 1 or disconnect_after_s is not None,
        }
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        if disconnect_after_s is not None:
            await asyncio.sleep(disconnect_after_s)
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # a client that keeps its side open
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def status(sent: list[dict[str, Any]]) -> tuple[int, str]:
    trailers = dict(sent[-1]["headers"])
    assert sent[-1]["type"] == "http.response.trailers"
    return int(trailers[b"grpc-status"]), trailers.get(b"grpc-message", b"").decode()


def messages(sent: list[dict[str, Any]], kind: Any) -> list[Any]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    found = []
    while body:
        length = int.from_bytes(body[1:5], "big")
        found.append(kind.FromString(body[5 : 5 + length]))
        body = body[5 + length :]
    return found


def test_a_unary_call_split_across_reads_is_answered() -> None:
    raw = frame(service_pb2.ModelMetadataRequest(name="m"))
    sent = call(META, [raw[:3], raw[3:8], raw[8:]], headers={"x-who": "tester"})
    assert sent[0]["status"] == 200 and sent[0]["trailers"] is True
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/grpc"
    [reply] = messages(sent, service_pb2.ModelMetadataResponse)
    assert (reply.name, reply.platform) == ("m", "tester")
    assert status(sent) == (0, "")


def test_a_gzip_message_is_inflated() -> None:
    raw = frame(service_pb2.ModelMetadataRequest(name="m"), compress="gzip")
    sent = call(META, [raw], headers={"grpc-encoding": "gzip", "x-who": "z"})
    assert messages(sent, service_pb2.ModelMetadataResponse)[0].platform == "z"
    sent = call(META, [raw], headers={"grpc-encoding": "snappy"})
    assert status(sent) == (
        grpc.StatusCode.UNIMPLEMENTED.value[0],
        "unsupported grpc-encoding 'snappy'",
    )


def test_abort_sends_its_code_and_a_percent_encoded_message() -> None:
    sent = call(META, [frame(service_pb2.ModelMetadataRequest(name="x"))])
    assert status(sent) == (grpc.StatusCode.NOT_FOUND.value[0], "no model '%C3%A9x' 100%25")
    assert messages(sent, service_pb2.ModelMetadataResponse) == []


def test_a_servicer_bug_is_unknown_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    sent = call(META, [frame(service_pb2.ModelMetadataRequest(name="boom"))])
    assert status(sent) == (
        grpc.StatusCode.UNKNOWN.value[0],
        "Unexpected ValueError: a servicer bug",
    )
    assert any("ModelMetadata failed" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("chunks", "code", "message"),
    [
        ([b"\x00\x00\x00\x00\x05\xff\xff"], "INTERNAL", "the request ended inside a message"),
        ([b"\x00\x00\x00\x00\x02\xff\xff"], "INTERNAL", "cannot parse the request"),
        ([b""], "INTERNAL", "the request carried no message"),
        ([b"\x00\x00\x10\x00\x00"], "RESOURCE_EXHAUSTED", "larger than max (1048576 vs. 1024)"),
    ],
)
def test_bad_bodies_get_a_status(chunks: list[bytes], code: str, message: str) -> None:
    sent = call(META, chunks, limit=1024)
    got_code, got_message = status(sent)
    assert got_code == getattr(grpc.StatusCode, code).value[0]
    assert message in got_message


def test_unknown_methods_draining_and_deadlines() -> None:
    empty = [frame(service_pb2.ServerLiveRequest())]
    sent = call("/inference.GRPCInferenceService/Nope", empty)
    assert status(sent)[0] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    sent = call(LIVE, empty, draining=True)
    assert status(sent) == (grpc.StatusCode.UNAVAILABLE.value[0], "the server is shutting down")
    sent = call(LIVE, empty, headers={"grpc-timeout": "20m"}, delay_s=1.0)
    assert status(sent) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "Deadline Exceeded")
    sent = call(LIVE, empty, headers={"grpc-timeout": "5S"}, delay_s=0.01)
    assert messages(sent, service_pb2.ServerLiveResponse)[0].live is True


def test_a_stream_answers_as_requests_arrive() -> None:
    requests = [frame(service_pb2.ModelInferRequest(id=f"r{i}")) for i in range(3)]
    sent = call(STREAM, [requests[0] + requests[1][:4], requests[1][4:], requests[2]])
    replies = messages(sent, service_pb2.ModelStreamInferResponse)
    assert [r.infer_response.id for r in replies] == ["r0", "r1", "r2"]
    assert status(sent) == (0, "")


class Held(Servicer):
    """Its calls run until cancelled; it records that they were."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[str] = []

    async def ServerLive(self, request: Any, context: CallContext) -> Any:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append("unary")
            raise

    async def ModelStreamInfer(self, requests: Any, context: CallContext) -> Any:
        async for request in requests:
            yield service_pb2.ModelStreamInferResponse(
                infer_response=service_pb2.ModelInferResponse(id=request.id)
            )
        try:  # the client's side stays open (a real stream's handler waits on its tasks)
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append("stream")
            raise


def test_a_client_that_goes_away_cancels_its_call() -> None:
    held = Held()
    sent = call(
        LIVE, [frame(service_pb2.ServerLiveRequest())], servicer=held, disconnect_after_s=0.05
    )
    assert held.cancelled == ["unary"] and sent == []
    first = frame(service_pb2.ModelInferRequest(id="r0"))
    sent = call(STREAM, [first, first[:3]], servicer=held, disconnect_after_s=0.05)
    assert held.cancelled == ["unary", "stream"]
    assert [r.infer_response.id for r in messages(sent, service_pb2.ModelStreamInferResponse)] == [
        "r0"
    ]
    assert sent[-1]["type"] == "http.response.body"  # no trailers: nobody is left to read them


def test_non_grpc_requests_are_refused_in_plain_http() -> None:
    sent = call(LIVE, [b""], http_version="1.1")
    assert sent[0]["status"] == 400 and b"HTTP/2" in sent[1]["body"]
    app = GrpcApp({}, 1024)
    scope = {"type": "http", "http_version": "2", "method": "POST", "path": LIVE, "headers": []}
    out: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    asyncio.run(app(scope, lambda: asyncio.sleep(0), send))  # type: ignore[arg-type,return-value]
    assert out[0]["status"] == 415


def test_timeouts_and_messages_are_encoded_as_grpc_says() -> None:
    assert parse_timeout(None) is None
    assert parse_timeout("100m") == pytest.approx(0.1)
    assert parse_timeout("2S") == 2.0 and parse_timeout("1H") == 3600.0
    assert parse_timeout("250u") == pytest.approx(250e-6)
    with pytest.raises(GrpcError):
        parse_timeout("1.5S")
    assert percent_encode("ok: 50% done\n") == b"ok: 50%25 done%0A"


def test_resolve_grpc_server(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_grpc_server("grpcio") == "grpcio"
    has_zttp = importlib.util.find_spec("zttp") is not None  # pip installs it on Python 3.11+
    assert resolve_grpc_server("auto") == ("uvicorn" if has_zttp else "grpcio")
    with pytest.raises(InputError, match="choose one of auto, uvicorn, grpcio"):
        resolve_grpc_server("nginx")
    # Python 3.10, where pip installs no zttp: auto falls back, an explicit uvicorn says why not
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert resolve_grpc_server("auto") == "grpcio"
    with pytest.raises(InputError, match="pip install zttp"):
        resolve_grpc_server("uvicorn")
