"""A small circuit breaker (Nygard, "Release It!", 2nd ed., ch. 5 "Circuit Breaker") for the Redis layer.

Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open: callers skip the guarded
resource at once (no socket, no wait) until :meth:`CircuitBreaker.close` is called: the Redis layer closes it from
its own background probe (a PING every ``CACHE_RETRY_S``), so no request ever waits on a probe and the half-open
trial of the classic pattern is that PING.

Why not pybreaker: ``pybreaker.CircuitBreaker.call`` runs every guarded call while holding the breaker's one
lock, which would serialise all concurrent Redis lookups of the request threads, and its half-open trial is a
real request. Here the request path reads one boolean and only failures take the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Thread-safe closed/open state with a consecutive-failure count.

    Args:
        failure_threshold: consecutive failures (>= 1) that open the circuit.
        on_open: called once per opening, outside the lock, with the failure that opened it.
    """

    def __init__(self, failure_threshold: int, on_open: Callable[[BaseException], None] | None = None) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self._on_open = on_open
        self._lock = threading.Lock()
        self._failures = 0
        self._open = False
        self.opened_at: float | None = None
        """``time.monotonic()`` of the last opening, or None while closed."""
        self.last_error: str | None = None
        """The failure that opened it, in words (for ``/health``)."""

    @property
    def is_open(self) -> bool:
        """True while callers must skip the resource (a plain read: cheap on every request)."""
        return self._open

    def record_success(self) -> None:
        """A call went through: the consecutive-failure count starts again."""
        if self._failures:
            with self._lock:
                self._failures = 0

    def record_failure(self, error: BaseException) -> bool:
        """A call failed; returns True when this failure opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._open or self._failures < self.failure_threshold:
                return False
            self._open = True
            self.opened_at = time.monotonic()
            self.last_error = f"{type(error).__name__}: {error}"[:200]
        if self._on_open is not None:
            self._on_open(error)
        return True

    def trip(self, error: BaseException) -> bool:
        """Open at once (e.g. the resource is down at start-up); returns True when it was closed before."""
        with self._lock:
            self._failures = max(self._failures, self.failure_threshold - 1)
        return self.record_failure(error)

    def close(self) -> None:
        """The resource answers again: let calls through."""
        with self._lock:
            self._open = False
            self._failures = 0
            self.opened_at = None
            self.last_error = None
