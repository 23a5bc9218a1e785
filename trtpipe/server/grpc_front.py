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
from typing import Any

import uvicorn
from tritonclient.grpc import service_pb2

from trtpipe.errors import InputError
from trtpipe.server.grpc import InferenceServicer, create_grpc_server
from trtpipe.server.grpc_asgi import GrpcApp, service_methods
from trtpipe.server.http import ServerState
from trtpipe.server.listeners import UvicornServer, listen
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
        self._sock = sock
        config = uvicorn.Config(
            app,
            http="zttp",
            http2=True,
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
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise InputError("the gRPC server stopped during startup")
            await asyncio.sleep(0.01)

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
    if resolve_grpc_server(choice) == "grpcio":
        return await start_grpcio(repository, state, host, port, max_message_bytes)
    sock = listen(host, port, "gRPC")
    servicer = InferenceServicer(repository, state)
    app = GrpcApp(service_methods(servicer, SERVICE), max_message_bytes, lambda: state.draining)
    server = UvicornGrpcServer(app, sock)
    await server.start()
    return server, int(sock.getsockname()[1])


async def start_grpcio(
    repository: ModelRepository, state: ServerState, host: str, port: int, max_message_bytes: int
) -> tuple[Any, int]:
    server = create_grpc_server(repository, state, max_message_bytes)
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
