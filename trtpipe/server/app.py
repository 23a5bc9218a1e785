"""HTTP and gRPC front ends in one process and one event loop, with graceful shutdown.

SIGTERM/SIGINT: readiness turns 503 at once (so a load balancer stops sending) and both listeners
stop accepting (new connections are refused). Requests already accepted, running or queued, finish
(up to ``drain_timeout_s``) and their responses carry ``Connection: close``; a request that
arrives meanwhile on a kept-alive connection gets 503 + ``Connection: close``
(:mod:`trtpipe.server.draining`), never a reset. Then the open connections are closed (after at
most ``drain_linger_s``), the batchers drain, the runners are closed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from trtpipe.server import heap
from trtpipe.server.draining import DrainingMiddleware
from trtpipe.server.fast_path import FastPath
from trtpipe.server.grpc_front import UvicornGrpcServer, start_grpc
from trtpipe.server.http import ServerState, create_http_app
from trtpipe.server.listeners import (
    UvicornServer,
    check_port_free,
    listen,
    serve_in_background,
)
from trtpipe.server.metrics import ServerMetrics
from trtpipe.server.repository import ModelRepository

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Sockets and limits. A port of None disables that front end; 0 picks a free port."""

    host: str = "127.0.0.1"
    http_port: int | None = 8000
    grpc_port: int | None = 8001
    max_body_bytes: int = 64 << 20
    drain_timeout_s: float = 30.0
    # After the accepted requests finished: how long kept-alive connections stay open (a request
    # on one gets 503 + Connection: close) before they are closed.
    drain_linger_s: float = 2.0
    access_log: bool = False
    # Freeze what the models loaded out of the garbage collector's full passes (server.heap).
    freeze_heap: bool = True
    # gRPC on uvicorn's HTTP/2 ("uvicorn"), grpc.aio's server ("grpcio"), or "auto"
    # (uvicorn where it can serve HTTP/2): see trtpipe.server.grpc_front
    grpc_server: str = "auto"


class InferenceServer:
    """Starts the models, then HTTP and gRPC; stops them in the reverse order, draining."""

    def __init__(self, repository: ModelRepository, config: ServerConfig | None = None):
        self.repository = repository
        self.config = config or ServerConfig()
        self.state = ServerState()
        self.metrics = ServerMetrics(repository)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: UvicornServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._drain: DrainingMiddleware | None = None
        self._grpc: Any = None
        self._stop_requested: asyncio.Event | None = None
        self._stopped = False

    async def start(self) -> None:
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        self.metrics.loop_cpu.watch()
        try:
            check_port_free(self.config.host, self.config.http_port, "HTTP")
            check_port_free(self.config.host, self.config.grpc_port, "gRPC")
            await self.repository.start()
            await self._start_http()
            await self._start_grpc()
        except BaseException:
            await self.stop()
            raise
        if self.config.freeze_heap:
            heap.freeze_loaded()
        self.state.started = True
        log.debug(
            "serving %s (http %s, grpc %s)",
            sorted(m.name for m in self.repository),
            self.http_port,
            self.grpc_port,
        )

    async def _start_http(self) -> None:
        if self.config.http_port is None:
            return
        sock = listen(self.config.host, self.config.http_port, "HTTP")
        self.http_port = int(sock.getsockname()[1])
        app = create_http_app(self.repository, self.metrics, self.state, self.config.max_body_bytes)
        self._drain = DrainingMiddleware(FastPath(app, self.repository, self.config.max_body_bytes))
        config = uvicorn.Config(
            self._drain,
            log_config=None,
            access_log=self.config.access_log,
            timeout_graceful_shutdown=int(self.config.drain_timeout_s),
            lifespan="off",
        )
        self._uvicorn = UvicornServer(config)
        self._http_task = await serve_in_background(self._uvicorn, sock, "HTTP")

    async def _start_grpc(self) -> None:
        if self.config.grpc_port is None:
            return
        self._grpc, self.grpc_port = await start_grpc(
            self.config.grpc_server,
            self.repository,
            self.state,
            self.config.host,
            self.config.grpc_port,
            self.config.max_body_bytes,
        )

    @property
    def grpc_is_uvicorn(self) -> bool:
        return isinstance(self._grpc, UvicornGrpcServer)

    def request_stop(self) -> None:
        """Begin a graceful stop (call on the server's loop; signal handlers do)."""
        self.state.draining = True
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Stop accepting, let accepted requests finish, drain the batchers, close the runners."""
        if self._stopped:
            return
        self._stopped = True
        self.state.draining = True
        waits: list[asyncio.Future[Any]] = []
        if self._grpc is not None:  # refuses new RPCs at once, lets running ones finish
            waits.append(asyncio.ensure_future(self._grpc.stop(self.config.drain_timeout_s)))
        if self._uvicorn is not None and self._http_task is not None:
            await self._drain_http(self._uvicorn, self._http_task)
            waits.append(self._http_task)
        results = await asyncio.gather(*waits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, SystemExit):
                log.warning("front end stopped with %r", result)
        await self.repository.stop(drain=True)
        if self.repository.shared_memory is not None:  # unmap (CUDA: cudaIpcCloseMemHandle)
            await asyncio.to_thread(self.repository.shared_memory.close)
        self._uvicorn = self._http_task = self._grpc = self._drain = None
        heap.release()
        log.info("server stopped")

    async def _drain_http(self, server: UvicornServer, task: asyncio.Task[None]) -> None:
        """Refuse new connections, let admitted requests finish while open connections get
        503 + close, then have uvicorn close what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        listeners = list(getattr(server, "servers", []))
        await accept_backlog(listeners)
        for listener in listeners:
            listener.close()
        if self._drain is not None:
            # only now do responses say Connection: close: a client told so earlier would
            # reconnect to a listener about to close, and a closing listener resets its backlog
            self._drain.start_draining(
                getattr(c, "client", None)
                for c in server.server_state.connections
                if getattr(c, "cycle", False) is None  # uvicorn: no request on it yet
            )
        if self._drain is not None and not task.done():
            if not await self._drain.wait_idle(self.config.drain_timeout_s):
                log.warning(
                    "%d HTTP request(s) still running after the drain timeout (%g s)",
                    self._drain.active,
                    self.config.drain_timeout_s,
                )
            linger_end = min(deadline, loop.time() + self.config.drain_linger_s)
            while server.server_state.connections and loop.time() < linger_end:
                await asyncio.sleep(0.02)
        # uvicorn closes idle connections and waits for the rest up to what is left of the timeout
        server.config.timeout_graceful_shutdown = max(1, int(deadline - loop.time() + 0.999))
        server.should_exit = True

    async def run(
        self,
        handle_signals: bool = True,
        on_started: Callable[[InferenceServer], None] | None = None,
    ) -> None:
        """Start, serve until SIGTERM/SIGINT (or request_stop), then stop gracefully.

        The handlers are installed before the models load, so a SIGTERM during a long start
        still ends in a clean stop and exit status 0.
        """
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            await self.start()
            if on_started is not None and not self.state.draining:
                on_started(self)
            await self.wait_stop_requested()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: draining and stopping", signal.Signals(sig).name)
        self.request_stop()


async def accept_backlog(listeners: list[asyncio.AbstractServer], rounds: int = 50) -> None:
    """Let the loop accept connections the kernel already queued before the listeners close:
    closing a listener resets them, and their requests may already be sent (they get 503 +
    Connection: close instead)."""

    def queued() -> bool:
        sockets = [sock for listener in listeners for sock in getattr(listener, "sockets", ())]
        return bool(sockets) and bool(select.select(sockets, [], [], 0)[0])

    for _ in range(rounds):
        if not queued():
            break
        await asyncio.sleep(0)
    for _ in range(3):  # accepted sockets get their transports on the next loop iterations
        await asyncio.sleep(0)


class ServerThread:
    """Run an InferenceServer on its own event loop in a background thread (tests, notebooks)."""

    def __init__(self, server: InferenceServer, start_timeout_s: float = 120.0):
        self.server = server
        self.start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            try:
                await self.server.wait_stop_requested()
            finally:
                await self.server.stop()

        asyncio.run(body())

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name="trtpipe-server", daemon=True)
        self._thread.start()
        if not self._started.wait(self.start_timeout_s):
            raise TimeoutError("server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
