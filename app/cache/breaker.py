"""A small circuit breaker (Nygard, "Release It!", 2nd ed., ch. 5 "Circuit Breaker") for the Redis layer.

Closed: calls go through; ``failure_threshold`` consecutive failures open it, unless a ``confirm`` callback is
given and says the resource still answers (a slow host, not a failing resource: see below). Open: callers skip the
guarded resource at once (no socket, no wait) until :meth:`CircuitBreaker.close` is called: the Redis layer closes
it from its own background probe (a PING every ``CACHE_RETRY_S``), so no request ever waits on a probe and the
half-open trial of the classic pattern is that PING.

Confirmation (issue #27, item 7): a 50 ms Redis timeout also fires when Redis is healthy but the host is busy (Redis
not scheduled for 50 ms among many runnable processes), and a burst of such timeouts from concurrent request
threads used to open the breaker and flap ``/health`` to ``cache: degraded``. So the failure that reaches the
threshold runs ``confirm()`` first (the Redis layer: one PING with the longer ``CACHE_BREAKER_CONFIRM_MS``): if it
answers, the count starts again and :attr:`CircuitBreaker.false_alarms` counts the alarm; only a resource that does
not answer that either opens the circuit. One confirmation runs at a time; failures of other threads meanwhile are
counted, they neither open the circuit nor start a second confirmation.

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
        confirm: called (outside the lock, in the failing caller's thread) when ``failure_threshold`` is reached;
            True means the resource still answers: the circuit stays closed. Must not raise. None: open at once.
    """

    def __init__(
        self,
        failure_threshold: int,
        on_open: Callable[[BaseException], None] | None = None,
        confirm: Callable[[], bool] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self._on_open = on_open
        self._confirm = confirm
        self._confirming = False
        self.false_alarms = 0
        """Thresholds reached while the resource still answered ``confirm`` (the circuit stayed closed)."""
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
            if self._open or self._confirming or self._failures < self.failure_threshold:
                return False
            self._confirming = self._confirm is not None
        if self._confirm is not None:
            try:
                answers = self._confirm()
            finally:
                with self._lock:
                    self._confirming = False
            if answers:
                with self._lock:
                    self._failures = 0
                    self.false_alarms += 1
                return False
        return self._open_now(error)

    def _open_now(self, error: BaseException) -> bool:
        with self._lock:
            if self._open:
                return False
            self._open = True
            self.opened_at = time.monotonic()
            self.last_error = f"{type(error).__name__}: {error}"[:200]
        if self._on_open is not None:
            self._on_open(error)
        return True

    def trip(self, error: BaseException) -> bool:
        """Open at once, without confirmation (e.g. the resource is down at start-up and the caller confirmed it
        already); returns True when it was closed before."""
        with self._lock:
            self._failures = max(self._failures, self.failure_threshold)
        return self._open_now(error)

    def close(self) -> None:
        """The resource answers again: let calls through."""
        with self._lock:
            self._open = False
            self._failures = 0
            self.opened_at = None
            self.last_error = None
