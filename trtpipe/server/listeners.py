"""Listening sockets and the uvicorn server both front ends run on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from trtpipe.errors import InputError


class UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handling: the InferenceServer decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_in_background(
    server: UvicornServer, sock: socket.socket, what: str
) -> asyncio.Task[None]:
    """Start ``server`` on ``sock`` and return its task once it accepts connections."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise InputError(f"the {what} server stopped during startup")
        await asyncio.sleep(0.01)
    return task


def listen(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket. ``proto`` is IPPROTO_TCP on purpose: asyncio sets TCP_NODELAY on
    accepted connections only then, and without it keep-alive clients wait ~40 ms per response
    (Nagle against delayed ACKs)."""
    sock = bound_socket(host, port, what)
    try:
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise port_error(host, port, what, exc) from None
    sock.setblocking(False)
    return sock


def bound_socket(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise port_error(host, port, what, exc) from None
    return sock


def port_error(host: str, port: int, what: str, exc: OSError) -> InputError:
    return InputError(
        f"cannot listen for {what} on {host}:{port} ({exc.strerror}); "
        f"choose another --{what.lower()}-port (0 disables)"
    )


def check_port_free(host: str, port: int | None, what: str) -> None:
    """Bind and release at once, so a port in use is reported before minutes of loading."""
    if port:
        bound_socket(host, port, what).close()
