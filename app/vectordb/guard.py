"""Fail fast while the database is down: a circuit breaker in front of any :class:`VectorDBHandler`.

:class:`GuardedHandler` wraps a handler (pgvector, Milvus, Manticore; embedded or remote), or anything else with
``health()`` and ``close()`` that talks to a database: the PostgreSQL write locks beside Milvus or Manticore
(app/storage/__init__.py). A monitor thread asks
the handler's ``health()`` once a second (every 0.5 s while the database is down, and at once when a request just
failed with :class:`app.errors.DatabaseUnavailableError`) and caches the answer, so:

- while the database is known to be down, every call raises :class:`DatabaseUnavailableError` (HTTP 503 with
  ``Retry-After``) in microseconds instead of holding a worker thread for a pool timeout;
- ``health()`` answers from the cache at once, with the reason (:attr:`GuardedHandler.down_reason`);
- a request that fails before the monitor noticed costs at most the handler's own timeout (for pgvector
  ``DB_REQUEST_TIMEOUT_S``, 0.5 s by default).

A failed request alone never opens the breaker: only a failed health probe does, so a slow moment under load
cannot turn into an outage of its own.

A database that *hangs* (a stopped server, a network that drops packets) must not leave a stale "ok" behind: a
probe that has not answered within ``probe_timeout_s`` counts as a failed one from that moment on (requests get the
503 at once, ``health()`` says down), whatever the handler's own timeouts, and :meth:`GuardedHandler.check_now`
(what ``GET /health`` asks) waits for a probe that started after the call instead of answering from the cache.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from app.errors import DatabaseUnavailableError
from app.vectordb.base import VectorDBHandler

log = logging.getLogger(__name__)

__all__ = ["GuardedHandler"]

#: seconds between health probes while the database answers
UP_PROBE_INTERVAL_S = 1.0
#: seconds between health probes while it does not (the embedded server's watchdog restarts it in about 1-2 s)
DOWN_PROBE_INTERVAL_S = 0.5
#: seconds a health probe may take before the database counts as down (a probe of a live server takes milliseconds;
#: pgvector's gives up after 1 s on its own connection)
PROBE_TIMEOUT_S = 1.5
#: :meth:`GuardedHandler.check_now` answers from a probe that succeeded at most this many seconds ago instead of
#: waiting for a new one (several /health callers at once share one probe)
FRESH_S = 0.1

# Attributes served by the wrapped handler unguarded: they never touch the database.
_UNGUARDED = frozenset({"backend_name", "vector_type"})


class GuardedHandler:
    """A :class:`VectorDBHandler` with a circuit breaker; every other attribute is the wrapped handler's.

    Args:
        db: the handler to guard; closed by :meth:`close`.
        name: what ``/health`` calls it when it is down (default ``"database"``).
        probe_timeout_s: seconds after which a probe that has not answered counts as failed
            (:data:`PROBE_TIMEOUT_S`).

    Thread-safe. The monitor thread starts here and stops in :meth:`close`.
    """

    def __init__(
        self, db: VectorDBHandler, *, name: str = "database", probe_timeout_s: float = PROBE_TIMEOUT_S
    ) -> None:
        self.db = db
        self.name = name
        self.probe_timeout_s = float(probe_timeout_s)
        self._down_reason: str | None = None
        self._down_since: float | None = None
        self._probe_started: float | None = None  # monotonic start of the probe in flight, None between probes
        self._probes = threading.Condition()  # guards the two counters below; notified when a probe finishes
        self._started = 0
        self._finished = 0
        self._last_ok = -1e9  # monotonic end of the last probe that succeeded
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="db-guard", daemon=True)
        self._thread.start()

    # --- state --------------------------------------------------------------------------------------------
    @property
    def down_reason(self) -> str | None:
        """Why the database is considered down (``None`` while it answers): the last probe's failure, or a probe in
        flight for longer than ``probe_timeout_s``."""
        reason = self._down_reason
        if reason is not None:
            return reason
        started = self._probe_started
        if started is not None and (waited := time.monotonic() - started) > self.probe_timeout_s:
            return f"it has not answered a health check for {waited:.1f} s"
        return None

    def health(self) -> bool:
        """The last probe's answer (or a probe overdue), at once (never blocks on the database, never raises)."""
        return self.down_reason is None

    def check_now(self, timeout_s: float | None = None) -> bool:
        """Whether the database answers a probe that starts after this call (what ``GET /health`` reports).

        Known down (:attr:`down_reason`): ``False`` at once, the monitor keeps probing every
        :data:`DOWN_PROBE_INTERVAL_S`. A probe that succeeded less than :data:`FRESH_S` ago: ``True`` at once.
        Otherwise wakes the monitor and waits at most ``timeout_s`` seconds (default
        ``probe_timeout_s``) for that fresh probe; no answer in time is ``False`` (the database hangs). Never raises.
        """
        if self.down_reason is not None:
            return False
        if time.monotonic() - self._last_ok < FRESH_S:
            return True
        timeout_s = self.probe_timeout_s if timeout_s is None else timeout_s
        with self._probes:
            target = self._started + 1  # probes run one at a time: the next one to start starts after now
            self._wake.set()
            if not self._probes.wait_for(lambda: self._finished >= target, timeout=timeout_s):
                return False
        return self.down_reason is None

    def _raise_if_down(self) -> None:
        reason = self.down_reason
        if reason is not None:
            raise DatabaseUnavailableError(f"The {self.name} is unavailable: {reason}")

    def _probe(self) -> None:
        with self._probes:
            self._started += 1
        started = self._probe_started = time.monotonic()
        try:
            ok = self.db.health()
        except Exception as exc:  # noqa: BLE001 - health must never raise; treat a raise as down
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        else:
            detail = f"it does not answer a health check (gave up after {time.monotonic() - started:.1f} s)"
        finally:
            self._probe_started = None
        if ok:
            self._last_ok = time.monotonic()
        self._record(ok, detail)
        with self._probes:
            self._finished += 1
            self._probes.notify_all()

    def _record(self, ok: bool, detail: str) -> None:
        if ok and self._down_reason is not None:
            log.warning("The %s answers again after %.1f s", self.name, time.monotonic() - (self._down_since or 0))
            self._down_reason, self._down_since = None, None
        elif not ok and self._down_reason is None:
            log.error("The %s is unavailable (%s); requests needing it answer 503 until it is back", self.name, detail)
            self._down_since = time.monotonic()
            self._down_reason = detail

    def _monitor(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the probe: a wake during it asks for one more, none is lost
            self._probe()
            interval = UP_PROBE_INTERVAL_S if self._down_reason is None else DOWN_PROBE_INTERVAL_S
            self._wake.wait(interval)

    # --- delegation ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.db, name)
        if name in _UNGUARDED or name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._raise_if_down()
            try:
                return attr(*args, **kwargs)
            except DatabaseUnavailableError:
                self._wake.set()  # let the monitor confirm (and open the breaker) now, not in a second
                raise

        return guarded

    def close(self) -> None:
        """Stop the monitor, then close the wrapped handler (and its embedded server, if any). Idempotent."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self.db.close()
