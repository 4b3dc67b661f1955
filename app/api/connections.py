"""How long a client may hold a connection without sending a request: the uvicorn options of ``python -m app``.

uvicorn bounds only the idle time between two requests of a kept-alive connection (``timeout_keep_alive``); a
client that opens a connection and then sends its request head slowly (a byte every few seconds: "slowloris"), or
nothing at all, holds the connection, and a file descriptor and the parser's memory with it, for as long as it
likes. :func:`server_options` adds that bound: the protocol classes here close a connection whose request head
(request line and headers) is not complete ``HTTP_HEADER_TIMEOUT_S`` after the connection opened, or after the
first byte of the next request on a kept-alive connection, answering ``408`` with a JSON ``detail`` first. A
request whose head arrived in time is not limited by it (its body and its answer, a long upload or Gradio's event
stream, are bounded elsewhere: ``MAX_UPLOAD_MB``, the request deadlines).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn[standard] installs httptools; plain uvicorn runs on h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from app.config import Settings


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        {"detail": f"The request head (request line and headers) did not arrive within {timeout_s:g} s."}
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"x-content-type-options: nosniff\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _HeadDeadline:
    """The request-head deadline of one connection (a mixin of the uvicorn protocol classes below)."""

    header_timeout_s: float = 10.0
    transport: asyncio.Transport
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_deadline(self) -> None:
        if self._head_timer is None and self.header_timeout_s > 0:
            self._head_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout_s))
            self.transport.close()


if HttpToolsProtocol is not None:

    class BoundedHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the request-head deadline."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:  # the first byte of a request
            super().on_message_begin()
            self._arm_head_deadline()

        def on_headers_complete(self) -> None:
            self._disarm_head_deadline()
            super().on_headers_complete()


class BoundedH11Protocol(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the request-head deadline."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_head_deadline()  # part of a request head is waiting for the rest
        elif self.conn.their_state is not h11.IDLE:
            self._disarm_head_deadline()


def protocol_class(header_timeout_s: float, http: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (``http``: ``auto``, ``httptools`` or ``h11``, as uvicorn's ``--http``) with a
    request-head deadline of ``header_timeout_s`` seconds (0: none)."""
    base: type = BoundedH11Protocol
    if http in ("auto", "httptools") and HttpToolsProtocol is not None:
        base = BoundedHttpToolsProtocol
    return type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s)})


def server_options(settings: Settings, http: str = "auto") -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` besides the app, host and port that bound
    client connections: ``HTTP_HEADER_TIMEOUT_S`` (the request head), ``HTTP_KEEP_ALIVE_S`` (idle between requests),
    and the log level."""
    return {
        "http": protocol_class(settings.http_header_timeout_s, http),
        "timeout_keep_alive": settings.http_keep_alive_s,
        "log_level": settings.log_level.lower(),
    }
