"""The shared layer (L2): embeddings in Redis, shared by every API process that uses the same ``CACHE_REDIS_URL``.

Faults never reach a request: every command is bounded by redis-py's own ``socket_timeout`` and
``socket_connect_timeout`` (``CACHE_REDIS_TIMEOUT_MS``, 50 ms by default) and retried once only when the
connection broke (redis-py's ``Retry`` on ``ConnectionError``: a connection left over from before a Redis restart
reconnects instead of failing), and any :class:`redis.exceptions.RedisError` becomes a miss.
``CACHE_BREAKER_FAILURES`` consecutive failures open a :class:`app.cache.breaker.CircuitBreaker` (one warning in
the log) once a confirming PING with the longer ``CACHE_BREAKER_CONFIRM_MS`` timeout fails too: on a busy host a
healthy Redis can miss the 50 ms timeout (it was not scheduled in time), and it answers that PING, so the breaker
stays closed and ``/health`` does not flap (issue #27, item 7; docs/caching.md). Once open, the layer is skipped
without any socket call, and a background thread PINGs Redis (with the confirming timeout) every ``CACHE_RETRY_S``
until it answers, then closes the breaker (one info line); that thread starts at the first opening and ends with
:meth:`RedisLayer.close`. A Redis at ``maxmemory`` with ``noeviction`` refuses writes with an
OOM error: that is counted and shown (``/health`` cache ``degraded``), reads go on, and the breaker stays closed.

Values are written with ``SET key value EX CACHE_TTL_S``; eviction beyond that is Redis's own (``maxmemory`` +
``maxmemory-policy allkeys-lfu`` in docker-compose.yml).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.retry import Retry

from app.cache.breaker import CircuitBreaker
from app.cache.keys import decode, encode

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1000
"""Redis commands kept for the p50/p95 of ``/stats``."""

MAX_CONNECTIONS = 64
"""Pooled connections per process: more than the request threads (anyio's default pool has 40)."""


@dataclass(frozen=True, slots=True)
class RedisLayerStats:
    """Counters of the Redis layer.

    ``hits``/``misses``: lookups that reached Redis; ``hit_rate`` = hits / (hits + misses). ``skipped``: lookups
    that did not try because the breaker was open. ``invalid``: values under our keys that :func:`decode` refused
    or of another Redis type (WRONGTYPE); they are recomputed and overwritten. ``errors``: failed commands
    (timeouts, refused connections, OOM). ``writes``: values stored. ``p50_ms``/``p95_ms``: latency of the last
    :data:`LATENCY_WINDOW` commands (GET and SET), ms.
    """

    state: Literal["ok", "degraded"]
    hits: int
    misses: int
    hit_rate: float
    skipped: int
    invalid: int
    errors: int
    writes: int
    p50_ms: float
    p95_ms: float


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.999999) - 1))]


class RedisLayer:
    """``key -> (D,) float32`` embedding in Redis; :meth:`get` and :meth:`put` never raise.

    The value codec is :meth:`_encode` / :meth:`_decode`: :class:`app.cache.thumbnails.ThumbnailRedisLayer` keeps
    JPEG thumbnails with the same timeouts, breaker and counters.

    Args:
        url: a redis-py URL (``redis://host:6379/0``, ``rediss://``, ``unix://``).
        dim: the embedding dimension D every value must have.
        ttl_s: seconds each value lives (``EX``).
        timeout_s: socket connect and read/write timeout, seconds.
        failure_threshold: consecutive failures that open the breaker (after a failed confirmation).
        confirm_timeout_s: timeout of the PING that confirms a failing Redis before the breaker opens (and of the
            reconnection PINGs); 0: no confirmation, the threshold opens it at once (the rule before issue #27).
        retry_s: seconds between reconnection PINGs while the breaker is open.
        on_redis_call: ``(operation, seconds, failed)`` after each command (metrics); must not raise.
    """

    name = "redis"
    what = "embeddings"
    """What the layer holds, for its log lines."""

    def __init__(
        self,
        url: str,
        dim: int,
        *,
        ttl_s: int,
        timeout_s: float,
        failure_threshold: int,
        retry_s: float,
        confirm_timeout_s: float = 0.0,
        on_redis_call: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self.dim = dim
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._on_call = on_redis_call
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            max_connections=MAX_CONNECTIONS,
            client_name="image-search",
        )
        # PINGs that confirm a failure (and reconnect) get their own small pool and the longer timeout.
        self.confirm_timeout_s = confirm_timeout_s
        self._probe_client = redis.Redis.from_url(
            url,
            socket_timeout=max(confirm_timeout_s, timeout_s),
            socket_connect_timeout=max(confirm_timeout_s, timeout_s),
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            max_connections=4,  # one confirmation at a time, the reconnection thread, start()
            client_name="image-search-probe",
        )
        self.breaker = CircuitBreaker(
            failure_threshold, on_open=self._opened, confirm=self._confirm if confirm_timeout_s > 0 else None
        )
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._hits = self._misses = self._skipped = self._invalid = self._errors = self._writes = 0
        self._full: str | None = None  # the last OOM refusal, until a write succeeds again
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """One PING (bounded by the timeout): a Redis that is down at start-up opens the breaker at once, so the
        service starts memory-only and reconnects by itself later. Never raises."""
        try:
            self._timed("ping", self.client.ping)
        except RedisError as exc:
            if not (self.confirm_timeout_s > 0 and self._confirm()):  # a busy host at start-up is not a dead Redis
                self.breaker.trip(exc)

    def close(self) -> None:
        """Stop the reconnection thread and close the pooled connections."""
        self._stop.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=5)
        for client in (self.client, self._probe_client):
            try:
                client.close()
            except RedisError:  # pragma: no cover - closing sockets of a dead server
                pass

    # --- the layer ---------------------------------------------------------------------------------------------
    def get(self, key: str) -> np.ndarray | None:
        """The valid embedding under ``key``, or None (missing, invalid, Redis failing or skipped)."""
        if self.breaker.is_open:
            with self._lock:
                self._skipped += 1
            return None
        try:
            raw = self._timed("get", self.client.get, key)
        except ResponseError:  # Redis answered, e.g. WRONGTYPE: foreign data under our key, not a fault
            self.breaker.record_success()
            with self._lock:
                self._invalid += 1
                self._misses += 1
            return None
        except RedisError as exc:
            self._failed(exc)
            return None
        self.breaker.record_success()
        if raw is None:
            with self._lock:
                self._misses += 1
            return None
        vector = self._decode(raw)
        with self._lock:
            if vector is None:
                self._invalid += 1
                self._misses += 1
            else:
                self._hits += 1
        if vector is None:
            log.debug("ignored an invalid cache value under %s (%d bytes)", key, len(raw))
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        """Store ``vector`` under ``key`` for ``ttl_s`` seconds; a failure is counted, never raised."""
        if self.breaker.is_open:
            return
        try:
            self._timed("set", self.client.set, key, self._encode(vector), ex=self.ttl_s)
        except OutOfMemoryError as exc:  # maxmemory with noeviction: Redis answers, it only refuses writes
            with self._lock:
                self._errors += 1
                first = self._full is None
                self._full = str(exc)[:200]
            if first:
                log.warning("Redis cache is full (%s): new %s stay in memory only", exc, self.what)
            return
        except RedisError as exc:
            self._failed(exc)
            return
        self.breaker.record_success()
        with self._lock:
            self._writes += 1
            if self._full is not None:
                self._full = None
                log.info("Redis cache accepts writes again")

    # --- state -------------------------------------------------------------------------------------------------
    @property
    def problem(self) -> str | None:
        """Why the layer is degraded, in words, or None when it works (cheap: no Redis call)."""
        if self.breaker.is_open:
            error = self.breaker.last_error
            return f"unreachable ({error}); serving from memory only, retrying every {self.retry_s:g} s"
        full = self._full
        if full is not None:
            return f"full, writes refused ({full})"
        return None

    def stats(self) -> RedisLayerStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            latencies = sorted(self._latencies)
            lookups = self._hits + self._misses
            return RedisLayerStats(
                state="degraded" if self.problem else "ok",
                hits=self._hits,
                misses=self._misses,
                hit_rate=round(self._hits / lookups, 4) if lookups else 0.0,
                skipped=self._skipped,
                invalid=self._invalid,
                errors=self._errors,
                writes=self._writes,
                p50_ms=round(_percentile(latencies, 0.50) * 1000, 3),
                p95_ms=round(_percentile(latencies, 0.95) * 1000, 3),
            )

    # --- internals ---------------------------------------------------------------------------------------------
    def _encode(self, value) -> bytes:  # noqa: ANN001 - the value type of the layer (a subclass may hold others)
        """The stored bytes of ``value``."""
        return encode(value)

    def _decode(self, raw: bytes):  # noqa: ANN202 - see _encode
        """The value in ``raw``, or ``None`` for anything this layer did not write (never raises)."""
        return decode(raw, self.dim)

    def _timed(self, operation: str, call: Callable, *args, **kwargs):
        start = time.perf_counter()
        failed = True
        try:
            result = call(*args, **kwargs)
            failed = False
            return result
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self._latencies.append(seconds)
            if self._on_call is not None:
                self._on_call(operation, seconds, failed)

    def _failed(self, exc: RedisError) -> None:
        with self._lock:
            self._errors += 1
        self.breaker.record_failure(exc)

    def _confirm(self) -> bool:
        """One PING bounded by ``confirm_timeout_s``: True when Redis answers (the failures were a slow host)."""
        start = time.perf_counter()
        try:
            self._probe_client.ping()
        except RedisError:
            return False
        log.debug(
            "Redis missed its %g ms timeout but answered a confirming PING in %.1f ms: a busy host, breaker stays "
            "closed",
            self.timeout_s * 1000,
            (time.perf_counter() - start) * 1000,
        )
        return True

    def _opened(self, error: BaseException) -> None:
        """The breaker opened: one warning, drop the pooled sockets, PING in the background until Redis answers."""
        log.warning(
            "Redis cache unreachable (%s: %s): serving %s from memory only, retrying every %g s",
            type(error).__name__,
            error,
            self.what,
            self.retry_s,
        )
        self.client.connection_pool.disconnect()
        with self._lock:  # one prober per layer, started at the first opening, stopped by close()
            if self._prober is None and not self._stop.is_set():
                self._prober = threading.Thread(target=self._probe, name="redis-cache-probe", daemon=True)
                self._prober.start()

    def _probe(self) -> None:
        """While the breaker is open, PING every ``retry_s``; the first answer closes it."""
        while not self._stop.wait(self.retry_s):
            if not self.breaker.is_open:
                continue
            try:
                self._probe_client.ping()
            except RedisError:
                continue
            self.breaker.close()
            log.info("Redis cache reachable again: two-level cache restored")
