"""The gRPC listener: the ASGI gRPC app on uvicorn's HTTP/2, or grpc.aio's own server.

Both serve the same :class:`~trtpipe.server.grpc.InferenceServicer` and stop alike: new calls
are refused at once and the running ones finish, up to the drain timeout. ``uvicorn`` is the
default where its HTTP/2 parser (``zttp``, Python 3.11+) is installed, because it costs about a
third of grpc.aio's CPU per call (:mod:`trtpipe.server.grpc_asgi`); ``grpcio`` stays selectable
(its HTTP/2 receive windows grow, which big tensors over long links want).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Any

import grpc
import uvicorn
from tritonclient.grpc import service_pb2, service_pb2_grpc

from trtpipe.errors import InputError
from trtpipe.server.grpc import InferenceServicer
from trtpipe.server.grpc_asgi import GrpcApp, service_methods
from trtpipe.server.http import ServerState
from trtpipe.server.listeners import UvicornServer, listen, serve_in_background
from trtpipe.server.repository import ModelRepository

GRPC_SERVERS = ("auto", "uvicorn", "grpcio")
SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# gRPC channels stay open between calls; uvicorn's 5 s default would close idle ones
IDLE_CONNECTION_S = 3600


def resolve_grpc_server(choice: str) -> str:
    """``uvicorn`` or ``grpcio`` for ``choice`` (``auto``: uvicorn where zttp is installed)."""
    if choice not in GRPC_SERVERS:
        raise InputError(f"--grpc-server {choice!r}: choose one of {', '.join(GRPC_SERVERS)}")
    has_http2 = importlib.util.find_spec("zttp") is not None
    if choice == "auto":
        return "uvicorn" if has_http2 else "grpcio"
    if choice == "uvicorn" and not has_http2:
        raise InputError(
            "--grpc-server uvicorn needs uvicorn's HTTP/2 parser: pip install zttp "
            "(Python 3.11+), or use --grpc-server grpcio"
        )
    return choice


class UvicornGrpcServer:
    """The ASGI gRPC app served by uvicorn over HTTP/2 (cleartext, prior knowledge)."""

    def __init__(self, app: GrpcApp, sock: Any):
        from trtpipe.server.grpc_connection import GrpcAutoProtocol  # imports zttp

        self._sock = sock
        config = uvicorn.Config(
            app,
            http=GrpcAutoProtocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=IDLE_CONNECTION_S,
        )
        self._server = UvicornServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = await serve_in_background(self._server, self._sock, "gRPC")

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish for up to ``grace`` seconds."""
        self._server.config.timeout_graceful_shutdown = max(1, int(grace + 0.999))
        self._server.should_exit = True
        if self._task is not None:
            await self._task


async def start_grpc(
    choice: str,
    repository: ModelRepository,
    state: ServerState,
    host: str,
    port: int,
    max_message_bytes: int,
) -> tuple[Any, int]:
    """The started gRPC server (with ``stop(grace)``) and the port it listens on."""
    servicer = InferenceServicer(repository, state)
    return await serve_servicer(
        resolve_grpc_server(choice),
        servicer,
        host,
        port,
        max_message_bytes,
        lambda: state.draining,
    )


async def serve_servicer(
    kind: str,
    servicer: Any,
    host: str,
    port: int,
    max_message_bytes: int,
    draining: Callable[[], bool] = lambda: False,
) -> tuple[Any, int]:
    """Serve ``servicer`` (the KServe service) on ``kind``'s server, started; and its port."""
    if kind == "grpcio":
        return await start_grpcio(servicer, host, port, max_message_bytes)
    sock = listen(host, port, "gRPC")
    app = GrpcApp(service_methods(servicer, SERVICE), max_message_bytes, draining)
    server = UvicornGrpcServer(app, sock)
    await server.start()
    return server, int(sock.getsockname()[1])


async def start_grpcio(
    servicer: Any, host: str, port: int, max_message_bytes: int
) -> tuple[Any, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise InputError(
            f"cannot listen for gRPC on {address}; choose another --grpc-port (0 disables)"
        )
    await server.start()
    return server, int(bound)
