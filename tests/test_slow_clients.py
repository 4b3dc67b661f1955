"""Slow clients are dropped (issue #27 item 8): connections that send their request head a byte at a time, or
nothing, are closed with a 408 once HTTP_HEADER_TIMEOUT_S has passed, an idle kept-alive connection after
HTTP_KEEP_ALIVE_S, while normal clients keep being answered. Real sockets against the real app served by uvicorn
with the options ``python -m app`` uses (:func:`app.api.connections.server_options`), on both HTTP parsers."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from app.api.connections import server_options
from app.main import create_app
from tests.helpers import make_settings, run_live_server

HEADER_S = 2.0
KEEP_ALIVE_S = 1.0
SLOW = 6  # slowloris connections
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nAccept: */*\r\nX-Padding: " + b"a" * 200


def _slowloris(port: int, interval_s: float, result: dict, n: int) -> None:
    """Open a connection, send HEAD a byte every ``interval_s`` and record when and how the server ended it."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.settimeout(interval_s or 0.5)
        try:
            for i in range(len(HEAD)):
                if interval_s:
                    s.sendall(HEAD[i : i + 1])
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    continue
                received += chunk
                if not chunk:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            if received and not received.endswith(b"}"):
                s.settimeout(5)
                received += s.recv(4096)
    result[n] = (time.monotonic() - started, received)


@pytest.mark.slow
@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_slowloris_connections_are_closed_within_the_bound_while_normal_clients_answer(
    tmp_path, database_url, offline_embedder, parser
):
    settings = make_settings(
        tmp_path / "data", database_url, http_header_timeout_s=HEADER_S, http_keep_alive_s=KEEP_ALIVE_S
    )
    options = server_options(settings, http=parser)
    assert options["http"].__mro__[1].__name__.lower().startswith(f"bounded{parser}".lower()[:10])
    with run_live_server(create_app(settings, embedder=offline_embedder), **options) as url:
        port = int(url.rsplit(":", 1)[1])
        results: dict[int, tuple[float, bytes]] = {}
        threads = [
            # one byte every 0.2 s (the whole head would take about 50 s), and one that sends nothing at all
            threading.Thread(target=_slowloris, args=(port, 0.2 if n else 0.0, results, n), daemon=True)
            for n in range(SLOW)
        ]
        for t in threads:
            t.start()
        # Meanwhile a normal client is answered, again and again, on new and on kept-alive connections.
        answered = 0
        deadline = time.monotonic() + HEADER_S + 1.0
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                assert http.get(f"{url}/health").status_code == 200
                answered += 1
                time.sleep(0.1)
        for t in threads:
            t.join(timeout=HEADER_S + 10)
        assert len(results) == SLOW, results
        for n, (took, received) in sorted(results.items()):
            assert HEADER_S - 0.2 <= took <= HEADER_S + 1.5, (n, took)  # closed by the server, within the bound
            assert received.startswith(b"HTTP/1.1 408 "), (n, received)
            assert b"did not arrive within 2 s" in received, received
        assert answered >= 10, answered

        # A head sent in a few pieces within the bound is answered as usual.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            for piece in (request[:10], request[10:30]):
                s.sendall(piece)
                time.sleep(HEADER_S / 4)
            s.sendall(request[30:])
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            # ... and the connection, idle after its answer, is closed after HTTP_KEEP_ALIVE_S, not kept for ever.
            started = time.monotonic()
            s.settimeout(10)
            while s.recv(4096):
                pass
            assert KEEP_ALIVE_S - 0.2 <= time.monotonic() - started <= KEEP_ALIVE_S + 1.0

        # A kept-alive connection whose next request head then trickles in gets the same bound again.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            s.settimeout(0.3)
            received = b""
            for i in range(len(HEAD)):
                try:
                    s.sendall(HEAD[i : i + 1])
                    chunk = s.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                received += chunk
                if not chunk:
                    break
            assert HEADER_S - 0.2 <= time.monotonic() - started <= HEADER_S + 1.5
            assert received.startswith(b"HTTP/1.1 408 "), received
