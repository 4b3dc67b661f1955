"""Client-side deadlines for blocking database calls: a hung server must not hold a request forever.

A server that stops answering without closing its sockets (a stopped process, a network that drops packets) is not
noticed by a blocking client: ``statement_timeout`` is enforced by the server itself, TCP keepalives do not exist on
the embedded server's Unix socket, and libpq has no client-side query timeout. :class:`Deadlines` closes that gap
for any socket-based client: while a call runs under :meth:`Deadlines.bound`, one scheduler thread waits for its
deadline and, when it passes first, shuts the connection's socket down (``shutdown(SHUT_RDWR)``). The blocked read
then returns at once with "server closed the connection", the client raises its own connection error (which the
backends already map to :class:`app.errors.DatabaseUnavailableError`, HTTP 503), and the connection is discarded
(psycopg's pool drops connections in a bad state when they are returned).

Firing and finishing exclude each other (one lock): a call that returned before its deadline is never shut down
afterwards, so a socket reused by the next call of a pooled connection is never touched.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

__all__ = ["Deadline", "Deadlines", "shutdown_socket"]


def shutdown_socket(fd: int) -> None:
    """Shut down (both directions) the socket behind file descriptor ``fd`` without closing ``fd`` itself.

    The descriptor stays owned by its client library, which sees end-of-file on its next read. Raises nothing: an
    ``fd`` that is not a connected socket any more is ignored.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return
    try:
        with socket.socket(fileno=dup) as sock:  # closes only the duplicate
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Deadline:
    """One bounded call: :attr:`fired` tells whether its deadline passed and its action ran."""

    __slots__ = ("action", "done", "fired", "seconds")

    def __init__(self, action: Callable[[], None], seconds: float) -> None:
        self.action = action
        self.seconds = seconds
        self.fired = False
        self.done = False


class Deadlines:
    """Runs an action (e.g. :func:`shutdown_socket`) when a call bounded by :meth:`bound` overruns.

    One daemon thread per instance, started on first use, stopped by :meth:`close`. Thread-safe; costs a heap push
    and a lock per bounded call, not a thread.

    Args:
        name: the scheduler thread's name (for thread dumps).
    """

    def __init__(self, name: str = "db-deadlines") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def bound(self, action: Callable[[], None], seconds: float | None) -> Iterator[Deadline]:
        """Run ``action`` (once, in the scheduler thread) if the ``with`` block is still running after ``seconds``.

        ``seconds`` ``None`` or ``<= 0``: no deadline (the block may run for as long as it needs). Yields the
        :class:`Deadline`, whose ``fired`` the caller reads to tell a deadline from another failure.
        """
        entry = Deadline(action, seconds or 0.0)
        if seconds is None or seconds <= 0:
            yield entry
            return
        with self._cond:
            if self._closed:
                raise RuntimeError("Deadlines is closed")
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield entry
        finally:
            with self._cond:  # after this, the action can no longer run
                entry.done = True

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when, _, entry = self._heap[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                entry.fired = True
                try:
                    entry.action()  # under the lock: the bounded block cannot finish (and reuse the socket) meanwhile
                except Exception:  # noqa: BLE001 - one failed action must not stop every later deadline
                    log.exception("A deadline action failed")

    def close(self) -> None:
        """Stop the scheduler thread; pending deadlines no longer fire. Idempotent."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
