"""uvicorn's HTTP/2 connection for gRPC, moved to a fresh connection before zttp's budgets end.

zttp guards every HTTP/2 connection against rapid-reset floods (CVE-2023-44487) with lifetime
budgets it does not let a server raise: 4,096 streams ever opened and 256 streams reset by the
peer. A gRPC channel is one long-lived connection, so its 4,097th call, or its 257th cancelled
call, would end the connection with GOAWAY ENHANCE_YOUR_CALM and fail every call in flight with
UNAVAILABLE. Well before that, this protocol sends a graceful GOAWAY (NO_ERROR, last stream
2^31-1, as gRPC servers do for ``max_connection_age``): the client opens a new connection for
its next calls, and the calls already sent, even those still on the wire, are served here. The
connection closes once the client has had ``RETIRE_GRACE_S`` to see the GOAWAY and its calls
have finished (a client normally closes it first): closing sooner would reset a call the client
sent before the GOAWAY reached it.

This module imports zttp; :mod:`trtpipe.server.grpc_front` imports it only for the uvicorn
server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.auto_zttp_impl import AutoZttpProtocol
from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol
from uvicorn.protocols.http.zttp_impl import ZttpProtocol

log = logging.getLogger(__name__)

# zttp's per-connection budgets (zttp 0.0.35, h2 Limits: max_streams, max_stream_resets)
ZTTP_MAX_STREAMS = 4096
ZTTP_MAX_PEER_RESETS = 256
# Move on with room to spare: a client may open (or reset) up to its concurrent streams (128
# at most, zttp's SETTINGS) before it reads the GOAWAY.
ROTATE_AFTER_STREAMS = ZTTP_MAX_STREAMS - 1024
ROTATE_AFTER_RESETS = ZTTP_MAX_PEER_RESETS - 128
LAST_STREAM_ID = 2**31 - 1
NO_ERROR = 0
RETIRE_GRACE_S = 5.0


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop leave in a single ``write``
    at the start of the next turn.

    A gRPC reply is three frames, and uvicorn writes each one as it is made: three system calls
    where one does, each a loopback delivery on the server's loop thread. Everything else is the
    wrapped transport's own; ``close`` sends what is pending first.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GrpcH2Protocol(ZttpH2Protocol):
    """One HTTP/2 connection: counts streams and peer resets, retires itself gracefully, and
    writes what one turn of the loop made in one system call."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.streams_opened = 0
        self.peer_resets = 0
        self.retiring = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # flow control stays on the socket's own transport
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

    def handle_request(self, event: Any) -> None:
        self.streams_opened += 1
        super().handle_request(event)
        self._retire_if_due()

    def handle_rst_stream(self, event: Any) -> None:
        self.peer_resets += 1
        self._retire_if_due()
        super().handle_rst_stream(event)

    def _retire_if_due(self) -> None:
        if self.retiring or (
            self.streams_opened < ROTATE_AFTER_STREAMS and self.peer_resets < ROTATE_AFTER_RESETS
        ):
            return
        self.retiring = True
        log.debug(
            "retiring a gRPC connection after %d streams, %d resets by the client",
            self.streams_opened,
            self.peer_resets,
        )
        self.conn.close(NO_ERROR, LAST_STREAM_ID)
        self.flush()
        # then uvicorn's graceful close: refuse new streams, close once the running ones finish
        self.loop.call_later(RETIRE_GRACE_S, self.shutdown)


class GrpcAutoProtocol(AutoZttpProtocol):
    """uvicorn's cleartext sniffing (prior-knowledge HTTP/2, else HTTP/1.1, which the gRPC app
    answers with 400), with :class:`GrpcH2Protocol` for HTTP/2."""

    def _switch(self, http2: bool, initial_data: bytes = b"") -> None:
        protocol_class = GrpcH2Protocol if http2 else ZttpProtocol
        protocol = protocol_class(  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if initial_data:
            protocol.data_received(initial_data)
